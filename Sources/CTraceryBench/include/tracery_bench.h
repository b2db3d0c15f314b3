// The functions `tracery bench trigger` traces, and empty C handlers, compiled as C so that the
// measured loop contains nothing but the traced call.
#ifndef TRACERY_BENCH_H
#define TRACERY_BENCH_H
#include <stdint.h>
#include <tracery.h>

/// The traced function: x + 1, with a 5-byte NOP at its entry and 8 bytes of NOPs before it.
long tracery_bench_target(long x);
/// Calls tracery_bench_target `iterations` times through a volatile pointer; returns the sum.
long tracery_bench_loop(long iterations);
/// x + 1 without a NOP (traced through a relocated prologue), and x in 4 bytes (through an int3).
long tracery_bench_plain_target(long x);
long tracery_bench_short_target(long x);
/// Calls `function` `iterations` times through a volatile pointer; returns the sum.
long tracery_bench_loop_calling(long (*function)(long), long iterations);

void tracery_bench_empty_entry(tracery_call *call, uint64_t cookie);
void tracery_bench_empty_exit(tracery_call *call, uint64_t cookie);
int tracery_bench_empty_modify_return(tracery_call *call, uint64_t cookie);
/// The same, each adding 1 to the word at `cookie`.
void tracery_bench_counting_entry(tracery_call *call, uint64_t cookie);
void tracery_bench_counting_exit(tracery_call *call, uint64_t cookie);
int tracery_bench_counting_modify_return(tracery_call *call, uint64_t cookie);
/// Empty graph handlers (the entry asks for the exit) and fprobe handlers.
int tracery_bench_empty_graph_entry(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie);
void tracery_bench_empty_graph_exit(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie);
int tracery_bench_empty_fprobe_entry(uint64_t site, tracery_call *call, uint64_t *data, uint64_t cookie);
void tracery_bench_empty_fprobe_exit(uint64_t site, tracery_call *call, uint64_t *data, uint64_t cookie);
#endif
