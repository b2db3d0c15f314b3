// Closes every descriptor it did not open (as daemons and OpenSSH do, up to the limit), opens
// its own file, which gets the lowest number free, and writes it between two runs of a million
// traced calls (dozens of the recorder's chunks: each new one is prepared through a
// descriptor). Writes "line 0" ... "line 999" to argv[1], prints the calls' sum.
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

__attribute__((noinline)) long work(long x) { return x * 3 + 1; }

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  for (int fd = 3; fd < 1024; fd++) close(fd);
  int out = open(argv[1], O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (out < 0) return 1;
  long sum = 0;
  for (int i = 0; i < 1000000; i++) sum += work(i);
  char line[64];
  for (int i = 0; i < 1000; i++) {
    int length = snprintf(line, sizeof line, "line %d\n", i);
    if (write(out, line, length) != length) return 1;
  }
  for (int i = 0; i < 1000000; i++) sum += work(i);
  close(out);
  printf("%ld\n", sum);
  return 0;
}
