// Forks N children (argv[1]) one after another; each makes two traced calls and exits. Prints
// "N children" when every child exited as it should.
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long work(long x) { return 3 * x + 1; }
__attribute__((noinline)) int child(long index) { return (int)(work(index) % 2 == (3 * index + 1) % 2 ? 0 : 1); }

int main(int argc, char **argv) {
  int count = argc > 1 ? atoi(argv[1]) : 10;
  int good = 0;
  for (int index = 0; index < count; index++) {
    pid_t pid = fork();
    if (pid == 0) _exit(child(index));
    int status = 0;
    waitpid(pid, &status, 0);
    if (WIFEXITED(status) && WEXITSTATUS(status) == 0) good++;
  }
  printf("%d children\n", good);
  return good == count ? 0 : 1;
}
