// A destructor that logs a backtrace while an exception unwinds through it (logging and check
// libraries do): the unwind has put the real return addresses back, the backtrace must walk
// through the traced calls the destructor made since, and the catch must still be reached.
#include <cstdio>
#include <stdexcept>
#include <execinfo.h>
struct Logger { ~Logger() { void *f[32]; int n = backtrace(f, 32); if (n < 3) std::puts("short"); } };
__attribute__((noinline)) int inner(int x) { Logger l; if (x > 2) throw std::runtime_error("x"); return x; }
__attribute__((noinline)) int middle(int x) { int r = inner(x); __asm__ volatile("" : "+r"(r)); return r + 1; }
int main() {
  int caught = 0, sum = 0;
  for (int i = 0; i < 6; i++) { try { sum += middle(i); } catch (const std::exception &) { caught++; } }
  std::printf("sum %d caught %d\n", sum, caught);
  return 0;
}
