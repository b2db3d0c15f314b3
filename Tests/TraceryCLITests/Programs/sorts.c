// Built as programs ship (-O2, no patch-site flag): sorts 64 numbers with the C library's qsort,
// which calls back into the program. Prints the sum of the smallest and largest, and how many
// comparisons qsort asked for.
#include <stdio.h>
#include <stdlib.h>

static long compared;

__attribute__((noinline)) int sort_compare(const void *a, const void *b) {
  compared++;
  long x = *(const long *)a, y = *(const long *)b;
  return (x > y) - (x < y);
}

__attribute__((noinline)) long sort_numbers(long *v, int n) {
  qsort(v, n, sizeof *v, sort_compare);
  return v[0] + v[n - 1];
}

int main(void) {
  long v[64];
  for (int i = 0; i < 64; i++) v[i] = (i * 37) % 64;
  long ends = sort_numbers(v, 64);
  printf("%ld %ld\n", ends, compared);
  return 0;
}
