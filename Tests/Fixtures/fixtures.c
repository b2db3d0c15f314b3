#include "fixtures.h"

#include <pthread.h>
#include <stdatomic.h>

#define TRACED __attribute__((patchable_function_entry(5, 0), noinline, used))

TRACED long tracery_fixture_add(long a, long b) { return a + b; }
TRACED long tracery_fixture_mul3(long a) { return a * 3; }
TRACED long tracery_fixture_mix(long a, long b, long c, long d, long e, long f) {
  return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f;
}
TRACED long tracery_fixture_sub(long a, long b) { return a - b; }

static atomic_int stop_flag;
static _Atomic uint64_t total_calls, total_wrong;
static pthread_t threads[16];
static int thread_count;

static void *hammer(void *arg) {
  long seed = (long)(intptr_t)arg;
  uint64_t calls = 0, wrong = 0;
  // Calls through volatile pointers so the compiler keeps every call.
  long (*volatile add)(long, long) = tracery_fixture_add;
  long (*volatile mul3)(long) = tracery_fixture_mul3;
  long (*volatile mix)(long, long, long, long, long, long) = tracery_fixture_mix;
  long (*volatile sub)(long, long) = tracery_fixture_sub;
  while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
    for (long i = 0; i < 1000; i++) {
      long x = seed + i;
      wrong += add(x, 7) != x + 7;
      wrong += mul3(x) != x * 3;
      wrong += mix(x, 1, 2, 3, 4, 5) != x + 2 + 6 + 12 + 20 + 30;
      wrong += sub(x, 5) != x - 5;
      calls += 4;
    }
  }
  atomic_fetch_add(&total_calls, calls);
  atomic_fetch_add(&total_wrong, wrong);
  return 0;
}

void tracery_fixture_hammers_start(int count) {
  atomic_store(&stop_flag, 0);
  atomic_store(&total_calls, 0);
  atomic_store(&total_wrong, 0);
  thread_count = count > 16 ? 16 : count;
  for (int i = 0; i < thread_count; i++) pthread_create(&threads[i], 0, hammer, (void *)(intptr_t)(i * 1000003));
}

uint64_t tracery_fixture_hammers_stop(uint64_t *wrong) {
  atomic_store(&stop_flag, 1);
  for (int i = 0; i < thread_count; i++) pthread_join(threads[i], 0);
  thread_count = 0;
  *wrong = atomic_load(&total_wrong);
  return atomic_load(&total_calls);
}
