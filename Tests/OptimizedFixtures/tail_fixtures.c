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
