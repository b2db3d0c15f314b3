// Built as programs ship (-O2 -mavx2): a function that takes and returns 256-bit vectors
// (ymm0-1), called two million times, each call a recorded event pair, so the recorder's refill
// (a new chunk every 65,536 events) falls between callers and the body many times. Prints
// "2000000 4000000 6000000 8000000" when every vector kept its upper half.
#include <immintrin.h>
#include <stdio.h>

__attribute__((noinline)) __m256d add(__m256d a, __m256d b) { return _mm256_add_pd(a, b); }

int main(void) {
  __m256d sum = _mm256_setzero_pd();
  __m256d step = _mm256_set_pd(4.0, 3.0, 2.0, 1.0);
  for (int i = 0; i < 2000000; i++) sum = add(sum, step);
  double lanes[4];
  _mm256_storeu_pd(lanes, sum);
  printf("%.0f %.0f %.0f %.0f\n", lanes[0], lanes[1], lanes[2], lanes[3]);
  return 0;
}
