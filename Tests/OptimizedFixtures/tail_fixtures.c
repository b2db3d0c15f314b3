#include "tail_fixtures.h"

#include <setjmp.h>
#include <string.h>

#define TRACED __attribute__((noinline))
#define UNTRACED __attribute__((noinline, patchable_function_entry(0, 0)))

TRACED long tracery_tail_leaf(long x) { return 3 * x + 1; }
TRACED long tracery_tail_mid(long x) { return tracery_tail_leaf(x + 1); }
TRACED long tracery_tail_top(long x) { return tracery_tail_mid(2 * x); }
TRACED long tracery_tail_outer(long x) {
  long result = tracery_tail_top(x);
  __asm__ volatile("" : "+r"(result));
  return result + 1000;
}

UNTRACED long tracery_tail_bridge(long x) { return tracery_tail_leaf(x * 5); }
TRACED long tracery_tail_via(long x) { return tracery_tail_bridge(x + 2); }

TRACED long tracery_tail_odd(long n);
TRACED long tracery_tail_even(long n) { return n == 0 ? 1 : tracery_tail_odd(n - 1); }
TRACED long tracery_tail_odd(long n) { return n == 0 ? 0 : tracery_tail_even(n - 1); }

static jmp_buf escape;
TRACED long tracery_tail_jumper_leaf(long x) {
  if (x > 0) longjmp(escape, 1);
  return 2 * x;
}
TRACED long tracery_tail_jumper_mid(long x) { return tracery_tail_jumper_leaf(x + 1); }
TRACED long tracery_tail_longjmp(long x) {
  volatile long argument = x;
  if (setjmp(escape) == 0) {
    tracery_tail_jumper_mid(argument);
    return -1;  // not reached
  }
  return tracery_tail_leaf(argument);
}

// Swift's async convention: each returns with `ret 8`; `run` takes 8 off rsp after its call.
#define ASYNC __attribute__((swiftasynccall))
#define CONTEXT __attribute__((swift_async_context))
TRACED ASYNC void tracery_async_leaf(long *CONTEXT box) {
  __asm__ volatile("" ::: "memory");
  box[0] += 3;
}
TRACED ASYNC void tracery_async_mid(long *CONTEXT box) {
  box[0] += 2;
  __attribute__((musttail)) return tracery_async_leaf(box);
}
TRACED long tracery_async_run(long x) {
  long box[1] = {x};
  tracery_async_mid(box);
  return box[0];
}
UNTRACED ASYNC void tracery_async_plain_leaf(long *CONTEXT box) {
  long value = box[0];
  __asm__ volatile("" : "+r"(value));
  box[0] = value + 3;
}
UNTRACED ASYNC void tracery_async_plain_mid(long *CONTEXT box) {
  long value = box[0];
  __asm__ volatile("" : "+r"(value));
  box[0] = value + 2;
  __attribute__((musttail)) return tracery_async_plain_leaf(box);
}
UNTRACED long tracery_async_plain_run(long x) {
  long box[1] = {x};
  tracery_async_plain_mid(box);
  __asm__ volatile("" ::: "memory");
  return box[0];
}
const void *tracery_async_functions(int plain, const void **mid, const void **leaf) {
  *mid = plain ? (const void *)tracery_async_plain_mid : (const void *)tracery_async_mid;
  *leaf = plain ? (const void *)tracery_async_plain_leaf : (const void *)tracery_async_leaf;
  return plain ? (const void *)tracery_async_plain_run : (const void *)tracery_async_run;
}

int tracery_tail_jumps(const void *from, const void *to, int length) {
  const unsigned char *code = from;
  for (int offset = 0; offset + 5 <= length; offset++) {
    if (code[offset] != 0xe9) continue;
    int displacement;
    memcpy(&displacement, code + offset + 1, 4);
    if (code + offset + 5 + displacement == (const unsigned char *)to) return 1;
  }
  return 0;
}
