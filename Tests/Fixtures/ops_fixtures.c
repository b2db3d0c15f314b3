#include "ops_fixtures.h"

#define TRACED __attribute__((patchable_function_entry(5, 0), noinline, noclone))

TRACED long tracery_ops_f1(long n) { return n + 1; }
TRACED long tracery_ops_f2(long n) { return n + 2; }
TRACED long tracery_ops_f3(long n) { return n + 3; }
TRACED long tracery_ops_f4(long n) { return n + 4; }
TRACED long tracery_ops_replacement(long n) { return n * 100; }

enum { sites = 16 };
static struct {
  uint64_t site;
  int calls[4];
} counts[sites];
static uint64_t last_caller;

void tracery_ops_reset(void) {
  for (int index = 0; index < sites; index++) counts[index] = (__typeof__(counts[0])){0};
  last_caller = 0;
}

void tracery_ops_count(tracery_call *call, uint64_t cookie) {
  last_caller = (uint64_t)__builtin_return_address(0);
  for (int index = 0; index < sites; index++) {
    if (counts[index].site == 0) counts[index].site = call->function;
    if (counts[index].site == call->function) {
      counts[index].calls[cookie & 3]++;
      return;
    }
  }
}

int tracery_ops_calls(uint64_t cookie, uint64_t site) {
  for (int index = 0; index < sites; index++)
    if (counts[index].site == site) return counts[index].calls[cookie & 3];
  return 0;
}

uint64_t tracery_ops_last_caller(void) { return last_caller; }

void tracery_ops_add_1000(tracery_call *call, uint64_t cookie) {
  (void)cookie;
  call->arguments[0] += 1000;
}

void tracery_ops_redirect(tracery_call *call, uint64_t cookie) {
  (void)cookie;
  call->function = (uint64_t)&tracery_ops_replacement;
}

static void (*fprobe_hook)(void);
static long fprobe_entries[8], fprobe_exits[8];
static uint64_t fprobe_data[8], fprobe_return[8];

void tracery_fprobe_set_hook(void (*hook)(void)) { fprobe_hook = hook; }

TRACED long tracery_fprobe_with_hook(long n) {
  if (fprobe_hook) fprobe_hook();
  __asm__ volatile("" : : : "memory");
  return n + 1;
}

int tracery_fprobe_entry(uint64_t site, tracery_call *call, uint64_t *data, uint64_t cookie) {
  (void)site;
  __atomic_fetch_add(&fprobe_entries[cookie & 7], 1, __ATOMIC_RELAXED);
  *data = call->arguments[0] * 10 + cookie;
  return 0;
}

void tracery_fprobe_exit(uint64_t site, tracery_call *call, uint64_t *data, uint64_t cookie) {
  (void)site;
  __atomic_fetch_add(&fprobe_exits[cookie & 7], 1, __ATOMIC_RELAXED);
  fprobe_data[cookie & 7] = *data;
  fprobe_return[cookie & 7] = call->return_value[0];
}

void tracery_fprobe_reset(void) {
  for (int index = 0; index < 8; index++) {
    fprobe_entries[index] = fprobe_exits[index] = 0;
    fprobe_data[index] = fprobe_return[index] = 0;
  }
}

long tracery_fprobe_entries(uint64_t cookie) { return __atomic_load_n(&fprobe_entries[cookie & 7], __ATOMIC_RELAXED); }
long tracery_fprobe_exits(uint64_t cookie) { return __atomic_load_n(&fprobe_exits[cookie & 7], __ATOMIC_RELAXED); }
uint64_t tracery_fprobe_last_data(uint64_t cookie) { return fprobe_data[cookie & 7]; }
uint64_t tracery_fprobe_last_return(uint64_t cookie) { return fprobe_return[cookie & 7]; }

static long multi_ok[16], multi_bad[16], multi_exits[16];

void tracery_multi_entry(tracery_call *call, uint64_t cookie) {
  int tag = cookie & 15;
  if (cookie >> 4 == call->function) __atomic_fetch_add(&multi_ok[tag], 1, __ATOMIC_RELAXED);
  else __atomic_fetch_add(&multi_bad[tag], 1, __ATOMIC_RELAXED);
}

void tracery_multi_exit(tracery_call *call, uint64_t cookie) {
  tracery_multi_entry(call, cookie);
  __atomic_fetch_add(&multi_exits[cookie & 15], 1, __ATOMIC_RELAXED);
}

/* Tag 14: counted as an entry and lets the body run; any other cookie: returns 4242, skips it. */
int tracery_multi_modify_return(tracery_call *call, uint64_t cookie) {
  if ((cookie & 15) == 14) {
    tracery_multi_entry(call, cookie);
    return 0;
  }
  call->return_value[0] = 4242;
  return 1;
}

void tracery_multi_reset(void) {
  for (int tag = 0; tag < 16; tag++) multi_ok[tag] = multi_bad[tag] = multi_exits[tag] = 0;
}
long tracery_multi_ok(int tag) { return __atomic_load_n(&multi_ok[tag], __ATOMIC_RELAXED); }
long tracery_multi_bad(int tag) { return __atomic_load_n(&multi_bad[tag], __ATOMIC_RELAXED); }
long tracery_multi_exits(int tag) { return __atomic_load_n(&multi_exits[tag], __ATOMIC_RELAXED); }
