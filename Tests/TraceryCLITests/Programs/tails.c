// Built as programs ship (-O2, no frame pointer): top, mid and the even/odd pair enter each other
// by tail calls (`jmp`), jump_mid tail-calls jumper, which longjmps out; then threads start one
// after another, each running one short traced call. Prints the sum of the results: 120 for no
// arguments.
#include <pthread.h>
#include <setjmp.h>
#include <stdio.h>

#define TRACED __attribute__((noinline))

TRACED long leaf(long x) { return 3 * x + 1; }
TRACED long mid(long x) { return leaf(x + 1); }
TRACED long top(long x) { return mid(2 * x); }

TRACED long odd(long n);
TRACED long even(long n) { return n == 0 ? 1 : odd(n - 1); }
TRACED long odd(long n) { return n == 0 ? 0 : even(n - 1); }

static jmp_buf escape;
TRACED long jumper(long x) {
  if (x > 0) longjmp(escape, 1);
  return x;
}
TRACED long jump_mid(long x) { return jumper(x + 1); }

TRACED void *worker(void *argument) { return (void *)leaf((long)argument); }

int main(int argc, char **argv) {
  (void)argv;
  long sum = top(argc);  // 10
  sum += even(4);        // 1
  if (setjmp(escape) == 0) sum += jump_mid(argc);
  sum += leaf(2);  // 7
  for (long index = 0; index < 3; index++) {
    pthread_t thread;
    void *result;
    pthread_create(&thread, 0, worker, (void *)(index + 10));
    pthread_join(thread, &result);
    sum += (long)result;  // 31 + 34 + 37
  }
  printf("%ld\n", sum);
  return 0;
}
