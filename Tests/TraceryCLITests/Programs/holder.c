// Holds another process under ptrace (PTRACE_SEIZE: it keeps running) until stdin closes: what a
// debugger attached to it looks like to `record -p`.
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>

int main(int argc, char **argv) {
  if (argc < 2 || ptrace(PTRACE_SEIZE, atoi(argv[1]), 0, 0) != 0) return 1;
  printf("holding\n");
  fflush(stdout);
  while (getchar() != EOF) {
  }
  return 0;
}
