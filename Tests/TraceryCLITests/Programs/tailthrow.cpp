// C++ built as it ships (-O2, no frame pointer): an exception thrown through tail-called traced
// frames (throw_top -> throw_mid -> thrower), caught in main; one caught inside a tail-called
// function (into_catcher -> catcher). Prints "202 -120 29".
#include <cstdio>

#define TRACED __attribute__((noinline))

TRACED long thrower(long v) {
  if (v > 100) throw v;
  return 7 * v;
}
TRACED long throw_mid(long v) { return thrower(v + 1); }
TRACED long throw_top(long v) { return throw_mid(v + 1); }

TRACED long catcher(long v) {
  try {
    long result = thrower(v);
    __asm__ volatile("" : "+r"(result));
    return result + 1;
  } catch (long caught) {
    return -caught;
  }
}
TRACED long into_catcher(long v) { return catcher(2 * v); }

int main() {
  long caught = 0;
  try {
    caught = throw_top(200);
  } catch (long value) {
    caught = value;
  }
  std::printf("%ld %ld %ld\n", caught, into_catcher(60), into_catcher(2));
  return 0;
}
