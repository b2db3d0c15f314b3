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
  int kind;  // 1 entry, 2 exit
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
#endif
