// Built as programs ship (-O2): sets its own SIGTRAP handler (as LLVM's crash handler does) with
// sigaction and with signal, raises SIGTRAP itself, and calls a function too short to relocate
// (traced through an int3 under `record --relocate`). Prints "traps 3 sum 499500 mine 1 1".
#include <signal.h>
#include <stdio.h>

static volatile sig_atomic_t traps;

__attribute__((noinline)) long tiny(long x) { return x; }

static void counted(int signal, siginfo_t *info, void *context) {
  (void)signal, (void)info, (void)context;
  traps += 1;
}

static void counted_plain(int signal) {
  (void)signal;
  traps += 1;
}

int main(void) {
  struct sigaction action = {0};
  action.sa_sigaction = counted;
  action.sa_flags = SA_SIGINFO;
  sigaction(SIGTRAP, &action, 0);
  long sum = 0;
  for (long i = 0; i < 1000; i++) sum += tiny(i);
  raise(SIGTRAP);
  __asm__ volatile("int3");
  // What the program set is what it reads back.
  struct sigaction now;
  sigaction(SIGTRAP, 0, &now);
  int mine = (now.sa_flags & SA_SIGINFO) && now.sa_sigaction == counted;
  signal(SIGTRAP, counted_plain);
  int again = signal(SIGTRAP, counted_plain) == counted_plain;
  raise(SIGTRAP);
  printf("traps %d sum %ld mine %d %d\n", (int)traps, sum, mine, again);
  return 0;
}
