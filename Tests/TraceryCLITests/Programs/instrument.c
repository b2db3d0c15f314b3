// The -finstrument-functions runtime of the call-count comparison: counts entries per function
// and writes "OFFSET COUNT" lines (offset from the executable's load address) to
// $TRACERY_COUNTS/counts.PID at exit.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SLOTS 4096
static void *functions[SLOTS];
static unsigned long counts[SLOTS];

__attribute__((no_instrument_function)) void __cyg_profile_func_enter(void *function, void *caller) {
  (void)caller;
  uintptr_t slot = ((uintptr_t)function >> 4) % SLOTS;
  for (;;) {
    void *expected = NULL;
    if (__atomic_compare_exchange_n(&functions[slot], &expected, function, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST) ||
        expected == function)
      break;
    slot = (slot + 1) % SLOTS;
  }
  __atomic_fetch_add(&counts[slot], 1, __ATOMIC_SEQ_CST);
}

__attribute__((no_instrument_function)) void __cyg_profile_func_exit(void *function, void *caller) {
  (void)function;
  (void)caller;
}

/// A fork child counts from zero: its file holds only its own calls.
__attribute__((no_instrument_function)) static void reset_counts(void) {
  for (int i = 0; i < SLOTS; i++) counts[i] = 0;
}

__attribute__((no_instrument_function, constructor)) static void start_counting(void) {
  pthread_atfork(NULL, NULL, reset_counts);
}

__attribute__((no_instrument_function, destructor)) static void write_counts(void) {
  const char *directory = getenv("TRACERY_COUNTS");
  if (!directory) return;
  char path[4096];
  snprintf(path, sizeof path, "%s/counts.%d", directory, (int)getpid());
  FILE *file = fopen(path, "w");
  if (!file) return;
  for (int i = 0; i < SLOTS; i++) {
    if (!functions[i]) continue;
    Dl_info info;
    if (!dladdr(functions[i], &info)) continue;
    fprintf(file, "%lx %lu\n", (unsigned long)((char *)functions[i] - (char *)info.dli_fbase), counts[i]);
  }
  fclose(file);
}

#ifdef __cplusplus
}
#endif
