#include "tail_fixtures.h"

#define TRACED extern "C" __attribute__((noinline))

TRACED long tracery_tail_thrower(long v) {
  if (v > 100) throw v;
  return 7 * v;
}
TRACED long tracery_tail_throw_mid(long v) { return tracery_tail_thrower(v + 1); }
TRACED long tracery_tail_throw_top(long v) { return tracery_tail_throw_mid(v + 1); }

extern "C" long tracery_tail_catch(long v) {
  try {
    return tracery_tail_throw_top(v) + 1000;
  } catch (long caught) {
    return caught;
  }
}

TRACED long tracery_tail_catcher(long v) {
  try {
    long result = tracery_tail_thrower(v);
    __asm__ volatile("" : "+r"(result));
    return result + 1;
  } catch (long caught) {
    return -caught;
  }
}
TRACED long tracery_tail_into_catcher(long v) { return tracery_tail_catcher(2 * v); }
