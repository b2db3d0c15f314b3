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
