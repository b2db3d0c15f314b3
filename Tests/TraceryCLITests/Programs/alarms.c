// Built as programs ship (-O2): a 200 µs interval timer whose handler runs traced calls and,
// every seventh time, siglongjmps back into main's loop, from wherever it interrupted the
// program: the middle of a traced call's entry or exit, or of the recorder's refill. Prints
// "done 3000".
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <sys/time.h>

static sigjmp_buf env;
static volatile long ticks;

__attribute__((noinline)) long leaf(long x) { return x + 1; }
__attribute__((noinline)) long mid(long x) { return leaf(x) * 2; }
__attribute__((noinline)) long deep(long x, int d) { return d ? deep(x, d - 1) + mid(x) : leaf(x); }

static void on_alarm(int signal) {
  (void)signal;
  ticks += mid(1) - 3;
  if (++ticks % 7 == 0) siglongjmp(env, 1);
}

int main(void) {
  struct sigaction action = {0};
  action.sa_handler = on_alarm;
  sigaction(SIGALRM, &action, 0);
  struct itimerval timer = {{0, 200}, {0, 200}};
  setitimer(ITIMER_REAL, &timer, 0);
  long sum = 0;
  volatile long rounds = 0;
  sigsetjmp(env, 1);
  while (rounds < 3000) {
    rounds++;
    sum += deep(rounds, 20) & 1;
  }
  struct itimerval off = {{0, 0}, {0, 0}};
  setitimer(ITIMER_REAL, &off, 0);
  printf("done %ld\n", (long)rounds);
  return 0;
}
