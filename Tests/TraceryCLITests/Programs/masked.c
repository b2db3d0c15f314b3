// Built as programs ship (-O2): a worker thread blocks every signal, then calls a function too
// short to relocate (4 bytes: traced through an int3 under `record --relocate`). Prints 499501.
#include <pthread.h>
#include <signal.h>
#include <stdio.h>

__attribute__((noinline)) long tiny(long x) { return x; }

static void *worker(void *argument) {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, 0);
  long sum = (long)argument;
  for (long i = 0; i < 1000; i++) sum += tiny(i);
  return (void *)sum;
}

int main(void) {
  pthread_t thread;
  void *result;
  pthread_create(&thread, 0, worker, (void *)0);
  pthread_join(thread, &result);
  printf("%ld\n", (long)result + tiny(1));
  return 0;
}
