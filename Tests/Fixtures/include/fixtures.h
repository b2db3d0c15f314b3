// C functions with a 5-byte NOP at their entry (no compiler flag needed), for in-process tests.
#ifndef TRACERY_FIXTURES_H
#define TRACERY_FIXTURES_H
#include <stdint.h>

long tracery_fixture_add(long a, long b);
long tracery_fixture_mul3(long a);
long tracery_fixture_mix(long a, long b, long c, long d, long e, long f);
long tracery_fixture_sub(long a, long b);

/// Starts `count` threads that call the fixtures in a loop and check every result.
void tracery_fixture_hammers_start(int count);
/// Stops them; returns the calls made and stores the wrong results seen in `*wrong`.
uint64_t tracery_fixture_hammers_stop(uint64_t *wrong);

/// Sleeps `milliseconds` in one system call on this thread — 0 nanosleep, 1 poll, 2 epoll_wait,
/// 3 select — with no signal blocked; returns its result and stores its errno in `*error`.
int tracery_fixture_sleep_in(int call, int milliseconds, int *error);
/// Sends thread `tid` the program's own signal, SIGRTMIN + 3, whose handler (installed here,
/// SA_RESTART) does nothing.
int tracery_fixture_send_program_signal(int tid);

#endif

// ---- Functions of every argument and return shape, for the trampoline tests ----
#include <tracery.h>

struct tracery_pair {
  long low, high;
};

long tracery_fixture_six(long a, long b, long c, long d, long e, long f);
double tracery_fixture_floats(double a, double b, long c, double d);
long tracery_fixture_varargs(int count, ...);
long tracery_fixture_eight(long a, long b, long c, long d, long e, long f, long g, long h);
struct tracery_pair tracery_fixture_pair(long a, long b);
double tracery_fixture_double(long a);
long tracery_fixture_calls_add(long a);
/// Blocks until `tracery_fixture_release` is called, then returns `value + 1`.
long tracery_fixture_block(long value);
void tracery_fixture_release(void);
int tracery_fixture_blocked(void);
/// Frames visible to backtrace() from inside a traced function.
long tracery_fixture_backtrace_depth(long unused);

// ---- Handlers that record what they see ----
struct tracery_fixture_record {
  uint64_t function, cookie, return_address;
  uint64_t arguments[6];
  uint64_t return_value[2];
  double float_arguments[8];
  double float_return;
  uint64_t stack_arguments[2];
  int kind;  // a tracery_handler_kind: 1 entry, 2 exit, 3 modify-return
};
extern struct tracery_fixture_record tracery_fixture_records[64];
extern int tracery_fixture_record_count;
void tracery_fixture_records_reset(void);
void tracery_fixture_entry_record(tracery_call *call, uint64_t cookie);
void tracery_fixture_exit_record(tracery_call *call, uint64_t cookie);
/// Records, then skips the body when the cookie is non-zero, returning the cookie.
int tracery_fixture_modify_record(tracery_call *call, uint64_t cookie);
/// Sets the first argument to the cookie.
void tracery_fixture_entry_set_arg0(tracery_call *call, uint64_t cookie);
/// Clobbers every caller-saved register it may, floating point included.
void tracery_fixture_entry_clobber(tracery_call *call, uint64_t cookie);
/// Calls tracery_fixture_double (traced or not) from inside a handler.
void tracery_fixture_entry_reenter(tracery_call *call, uint64_t cookie);
void tracery_fixture_empty_handler(tracery_call *call, uint64_t cookie);
/// Accessors (Swift 6 refuses direct access to mutable C globals).
int tracery_fixture_records_count(void);
struct tracery_fixture_record tracery_fixture_record_at(int index);
/// The varargs fixture's address, and a C call of it: varargs(3, 1.5, 2.5, 3.5) (Swift cannot
/// call a variadic C function, which needs al set).
void *tracery_fixture_varargs_address(void);
long tracery_fixture_varargs_call(void);
/// Entry handler that stores backtrace()'s frame count, read with tracery_fixture_handler_depth.
void tracery_fixture_entry_backtrace(tracery_call *call, uint64_t cookie);
int tracery_fixture_handler_depth(void);
/// Like the hammers above, for the functions the Tracer tests trace (six, floats, pair).
void tracery_fixture_tracer_hammers_start(int count);
/// A thread that blocks every signal and spins (never entering a system call) until stopped:
/// the one kind of thread the trampoline reclaimer cannot inspect.
void tracery_fixture_spinner_start(void);
void tracery_fixture_spinner_stop(void);
/// A thread spinning with `(masked_base ^ 0x5a5a5a5a5a5a5a5a) + 8` in r12 and nowhere in memory.
void tracery_fixture_holder_start(uint64_t masked_base);
void tracery_fixture_holder_stop(void);
/// x, in 4 bytes without a NOP (`mov rax, rdi; ret`): traced through an int3.
long tracery_fixture_short(long x);
long tracery_fixture_short_other(long x);
