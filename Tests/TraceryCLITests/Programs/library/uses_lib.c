// Calls into tail_lib.c's library, found through the program's RUNPATH ($ORIGIN/lib). Prints 10.
#include <stdio.h>
int lib_entry(int);
__attribute__((noinline)) int local(int x) { return lib_entry(x) + 1; }
int main(void) {
  printf("%d\n", local(2));
  return 0;
}
