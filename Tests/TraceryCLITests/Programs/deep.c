// A recursion deeper than an event's depth field holds (2^14) or than the shadow stack (65,535
// frames). -O2 keeps it a recursion: the result is used after the recursive call.
#include <stdio.h>
#include <stdlib.h>
#define NOINLINE __attribute__((noinline))
NOINLINE long down(long n) {
  if (n == 0) return 0;
  long r = down(n - 1);
  __asm__ volatile("" : "+r"(r));
  return r + 1;
}
int main(int argc, char **argv) {
  long n = argc > 1 ? atol(argv[1]) : 20000;
  printf("%ld %ld\n", down(n), down(10));
  return 0;
}
