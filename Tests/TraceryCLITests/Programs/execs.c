// Execs itself once (built by RecordCommandTests): the agent must record both images.
#include <stdio.h>
#include <string.h>
#include <unistd.h>

__attribute__((noinline)) int before_exec(int x) { return x + 1; }
__attribute__((noinline)) int after_exec(int x) { return x * 2; }

int main(int argc, char **argv) {
  if (argc > 1 && strcmp(argv[1], "again") == 0) {
    printf("after %d\n", after_exec(21));
    return 0;
  }
  printf("before %d\n", before_exec(1));
  fflush(stdout);
  execl("/proc/self/exe", argv[0], "again", (char *)0);
  return 1;
}
