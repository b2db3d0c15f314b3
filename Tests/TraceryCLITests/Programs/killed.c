// Calls step() N times, then kills itself with SIGKILL inside a traced function two traced
// levels down (argument "kill": main → fatal → die), or returns 7 (argument "exit").
#include <signal.h>
#include <string.h>

__attribute__((noinline)) long step(long i) { return i * 2; }
__attribute__((noinline)) void die(void) { raise(SIGKILL); }
__attribute__((noinline)) void fatal(void) {
  die();
  __asm__ volatile("");
}

int main(int argc, char **argv) {
  long total = 0;
  for (long i = 0; i < 100; i++) total += step(i);
  if (argc > 1 && strcmp(argv[1], "kill") == 0) fatal();
  return total == 9900 ? 7 : 1;
}
