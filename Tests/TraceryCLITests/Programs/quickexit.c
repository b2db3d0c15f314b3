// Leaving without exit(): a program that ends by _exit (dash, daemons' children after fork) or
// _Exit runs no atexit handler, and a vfork child that fails its exec calls _exit in its
// parent's memory. The parent makes traced calls, vforks a child that _exits at once, makes
// more, prints its sum, and leaves the way the argument says: exit, _exit, _Exit, or _exit or
// exit from a signal handler (`handler`, `exit-handler`).
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long leaf(long x) { return x * 3 + 1; }
__attribute__((noinline)) long work(int n) {
  long sum = 0;
  for (int i = 0; i < n; i++) sum += leaf(i);
  return sum;
}

static void leave(int signal) {
  (void)signal;
  _exit(3);
}

static void leave_by_exit(int signal) {
  (void)signal;
  exit(3);
}

int main(int argc, char **argv) {
  const char *way = argc > 1 ? argv[1] : "exit";
  long sum = work(1000);
  pid_t child = vfork();
  if (child == 0) _exit(7);
  int status = 0;
  waitpid(child, &status, 0);
  sum += work(2000) + WEXITSTATUS(status);
  printf("%ld\n", sum);
  fflush(stdout);
  if (strcmp(way, "handler") == 0 || strcmp(way, "exit-handler") == 0) {
    // (Started by the test runner, the program inherits its signal mask.)
    sigset_t usr1;
    sigemptyset(&usr1);
    sigaddset(&usr1, SIGUSR1);
    sigprocmask(SIG_UNBLOCK, &usr1, NULL);
    signal(SIGUSR1, strcmp(way, "handler") == 0 ? leave : leave_by_exit);
    raise(SIGUSR1);
  }
  if (strcmp(way, "_exit") == 0) _exit(3);
  if (strcmp(way, "_Exit") == 0) _Exit(3);
  exit(3);
}
