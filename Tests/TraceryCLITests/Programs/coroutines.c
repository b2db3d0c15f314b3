// Two stacks on one thread (swapcontext, as coroutine and fiber libraries switch): `outer`, on
// the thread's stack, switches into a coroutine in the middle of each call; the coroutine's
// `inner` switches back in the middle of each of its calls, so every switch leaves traced calls
// suspended on the other stack. N rounds (argv[1], 100 by default): outer and inner are each
// called N times, leaf 4N - 1 times (the last inner never resumes).
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>

static ucontext_t main_context, coroutine_context;
static char coroutine_stack[1 << 16];
static volatile long sum;

__attribute__((noinline)) void leaf(int i) { sum += i; }

__attribute__((noinline)) void inner(int i) {
  leaf(i);
  swapcontext(&coroutine_context, &main_context);
  leaf(i);
}

__attribute__((noinline)) void body(void) {
  for (int i = 0;; i++) inner(i);
}

__attribute__((noinline)) void outer(int i) {
  leaf(i);
  swapcontext(&main_context, &coroutine_context);
  leaf(i);
}

int main(int argc, char **argv) {
  int rounds = argc > 1 ? atoi(argv[1]) : 100;
  getcontext(&coroutine_context);
  coroutine_context.uc_stack.ss_sp = coroutine_stack;
  coroutine_context.uc_stack.ss_size = sizeof coroutine_stack;
  coroutine_context.uc_link = &main_context;
  makecontext(&coroutine_context, body, 0);
  for (int i = 0; i < rounds; i++) outer(i);
  printf("%ld\n", sum);
  return 0;
}
