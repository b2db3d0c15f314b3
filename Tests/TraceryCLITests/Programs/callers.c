// Functions that look at their callers: dlsym(RTLD_NEXT) finds the next definition after the
// calling object (its return address says which), backtrace() walks the stack through traced
// calls. Built with -fsanitize=address too (gcc's runtime, libasan.so, wants to be preloaded
// first): argument "overflow" reads past a heap block, which ASan reports with its stack.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINLINE __attribute__((noinline))
NOINLINE int depth3(void) {
  void *frames[64];
  return backtrace(frames, 64);
}
NOINLINE int depth2(void) {
  int n = depth3();
  __asm__ volatile("" : "+r"(n));
  return n;
}
NOINLINE int depth1(void) {
  int n = depth2();
  __asm__ volatile("" : "+r"(n));
  return n;
}
NOINLINE long element(long *block, long index) { return block[index]; }

int main(int argc, char **argv) {
  void *next = dlsym(RTLD_NEXT, "puts");
  printf("next %s, frames %d\n", next != NULL ? "found" : "missing", depth1());
  if (argc > 1 && strcmp(argv[1], "overflow") == 0) {
    long *block = calloc(4, sizeof(long));
    printf("%ld\n", element(block, 4));
  }
  return 0;
}
