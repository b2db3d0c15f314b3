// Functions and handlers for the function-graph tests.
#ifndef TRACERY_GRAPH_FIXTURES_H
#define TRACERY_GRAPH_FIXTURES_H
#include <stdint.h>
#include <tracery.h>

/// outer(n) = middle(n) + 1; middle(n) = inner(n) * 2; inner(n) = n + 3.
long tracery_graph_outer(long n);
long tracery_graph_middle(long n);
long tracery_graph_inner(long n);
/// Recurses `depth` levels through itself; returns depth.
long tracery_graph_recurse(long depth);
/// Calls outer → middle → inner, where inner longjmps back here; then calls outer(1) normally.
/// Returns outer(1)'s result (9) if all went well.
long tracery_graph_longjmp(long unused);
/// Returns n * 10 (sets the flag when called).
long tracery_graph_leaf(long n);

/// Installs a SIGUSR1 handler that calls outer(2), calls middle(n), raises SIGUSR1, returns
/// middle(n) + outer(2).
long tracery_graph_signal(long n);
/// Calls outer() at least `calls` times (and until 20 timer signals came) while an interval
/// timer's SIGALRM handler calls leaf(1); returns how many handler calls saw the right result.
long tracery_graph_signal_storm(long calls, long interval_us);
/// Counting handlers (the entry asks for the exit); the storm resets the counts.
int tracery_graph_count_entry(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie);
void tracery_graph_count_exit(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie);
long tracery_graph_counted_entries(void);
long tracery_graph_counted_exits(void);

/// One event a recording graph handler saw.
struct tracery_graph_event {
  uint64_t cookie, site, depth, data, return_value;
  int kind;  // a tracery_handler_kind: 1 entry, 2 exit
};
void tracery_graph_events_reset(void);
int tracery_graph_events_count(void);
struct tracery_graph_event tracery_graph_event_at(int index);
/// Entry: records, stores cookie * 1000 + depth in data[0], returns 1 (wants the exit).
int tracery_graph_entry_record(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie);
/// Exit: records (with data[0] as the entry left it).
void tracery_graph_exit_record(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie);
/// Entry that declines the exit.
int tracery_graph_entry_decline(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie);

/// On a new thread whose stack lies below its alternate signal stack: alt_outer(n) raises
/// SIGUSR2, whose handler (on the alternate stack) calls leaf(2) and, with `escape`, the traced
/// alt_escape, which siglongjmps back into alt_outer; alt_outer returns middle(n) + leaf(2),
/// then outer(1) is called. Returns alt_outer(n) + 1000 * outer(1) (9028 for n = 1), or a
/// negative number when the stacks could not be set up that way.
long tracery_graph_altstack(long n, int escape);
long tracery_graph_alt_outer(long n);
long tracery_graph_alt_escape(long n);

/// Starts a coroutine (ucontext, its stack in .bss) from the traced co_start(n); the coroutine
/// calls the traced co_inner(40), which yields back; co_start returns n * 2 while co_inner is
/// suspended; then middle(n) runs, and the coroutine resumes (co_inner returns 41). Returns
/// 2n + middle(n) + 41 (51 for n = 1).
long tracery_graph_coroutines(long n);
/// The same in two steps: co_begin returns co_start(n) with co_inner suspended; co_finish
/// resumes the coroutine and returns what co_inner returned (41).
long tracery_graph_co_begin(long n);
long tracery_graph_co_finish(void);
long tracery_graph_co_start(long n);
long tracery_graph_co_inner(long n);

/// Scrubs the stack below it, then blocks in tracery_fixture_block(value) (value + 1).
long tracery_graph_block(long value);

/// `rounds` rounds of ping-pong between the thread (ping_a) and a coroutine (ping_b, then
/// leaf(1)), each side yielding from inside its traced call, while an interval timer's handler
/// calls leaf(1). Returns the sum of every ping_a (n + 1) and ping_b (n + 2) result plus 10 per
/// coroutine leaf call; stores how many timer calls saw leaf(1) == 10.
long tracery_graph_ping_pong(long rounds, long interval_us, long *timer_calls);
long tracery_graph_ping_a(long n);
long tracery_graph_ping_b(long n);

/// A thread that calls the traced alt_spin_traced(n) (n + 1), which raises SIGUSR2, whose
/// handler spins on the thread's alternate stack until tracery_alt_spin_finish (which joins the
/// thread and returns the result). start returns pthread_create's result.
int tracery_alt_spin_start(long n);
int tracery_alt_spinning(void);
long tracery_alt_spin_finish(void);
long tracery_alt_spin_traced(long n);

/// a * x + b * y, with its arguments in rdi, xmm0, rsi, xmm1 and its result in xmm0.
double tracery_graph_mix(long a, double x, long b, double y);
/// What the clobbering handlers saw: at the entry the first two integer and float arguments, at
/// the exit the first integer argument (the frame keeps the entry's) and the integer and float
/// results.
struct tracery_graph_seen {
  uint64_t entry_arguments[2];
  double entry_floats[2];
  uint64_t exit_argument, exit_return;
  double exit_float_return;
  int entries, exits;
};
void tracery_graph_seen_reset(void);
struct tracery_graph_seen tracery_graph_seen_now(void);
/// Entry and exit handlers that record (`tracery_graph_seen`) and then overwrite every register
/// a C function may: rax, rcx, rdx, rsi, rdi, r8-r11 and xmm0-7 (the entry wants the exit).
int tracery_graph_entry_clobber(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie);
void tracery_graph_exit_clobber(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie);
/// The main thread's stack as glibc's pthread_getattr_np gives it (the main thread is
/// remembered by a constructor, before any test runs); 0 on success.
int tracery_main_thread_stack(uint64_t *low, uint64_t *high);
#endif
