// Functions and callbacks for the ops tests.
#ifndef TRACERY_OPS_FIXTURES_H
#define TRACERY_OPS_FIXTURES_H
#include <stdint.h>
#include <tracery.h>

/// ops_fN(n) = n + N.
long tracery_ops_f1(long n);
long tracery_ops_f2(long n);
long tracery_ops_f3(long n);
long tracery_ops_f4(long n);
/// n * 100: what a callback may redirect a call to.
long tracery_ops_replacement(long n);

/// Counts calls per (cookie 0-3, site), and keeps the last callback's return address (where
/// the callback was called from).
void tracery_ops_count(tracery_call *call, uint64_t cookie);
void tracery_ops_reset(void);
int tracery_ops_calls(uint64_t cookie, uint64_t site);
uint64_t tracery_ops_last_caller(void);
/// Adds 1000 to the first argument.
void tracery_ops_add_1000(tracery_call *call, uint64_t cookie);
/// Sends the call to tracery_ops_replacement.
void tracery_ops_redirect(tracery_call *call, uint64_t cookie);

// fprobe fixtures.
/// Calls the hook (if set), then returns n + 1.
long tracery_fprobe_with_hook(long n);
void tracery_fprobe_set_hook(void (*hook)(void));
/// Entry: counts (per cookie 0-7), stores arguments[0] * 10 + cookie as the probe's data.
int tracery_fprobe_entry(uint64_t site, tracery_call *call, uint64_t *data, uint64_t cookie);
/// Exit: counts, keeps the data and the return value it saw.
void tracery_fprobe_exit(uint64_t site, tracery_call *call, uint64_t *data, uint64_t cookie);
void tracery_fprobe_reset(void);
long tracery_fprobe_entries(uint64_t cookie);
long tracery_fprobe_exits(uint64_t cookie);
uint64_t tracery_fprobe_last_data(uint64_t cookie);
uint64_t tracery_fprobe_last_return(uint64_t cookie);

// multi-attach fixtures. The cookie is the function's address << 4 | a tag (0-15): the entry
// counts, per tag, calls whose cookie names the function they see (ok) and the others (bad).
void tracery_multi_entry(tracery_call *call, uint64_t cookie);
/// As the entry, and counts exits per tag.
void tracery_multi_exit(tracery_call *call, uint64_t cookie);
/// Skips the body; the function returns 4242.
int tracery_multi_modify_return(tracery_call *call, uint64_t cookie);
void tracery_multi_reset(void);
long tracery_multi_ok(int tag);
long tracery_multi_bad(int tag);
long tracery_multi_exits(int tag);
#endif
