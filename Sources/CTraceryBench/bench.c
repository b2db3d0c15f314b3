#include "tracery_bench.h"

// 8 bytes of padding before the entry for the multi-attach record pointer, a 5-byte NOP at it.
__attribute__((patchable_function_entry(13, 8), aligned(64), noinline)) long tracery_bench_target(long x) {
  return x + 1;
}

__attribute__((aligned(64))) long tracery_bench_loop(long iterations) {
  long (*volatile target)(long) = tracery_bench_target;
  long sum = 0;
  for (long i = 0; i < iterations; i++) sum += target(i);
  return sum;
}

__attribute__((aligned(64))) void tracery_bench_empty_entry(tracery_call *call, uint64_t cookie) {
  (void)call;
  (void)cookie;
}
__attribute__((aligned(64))) void tracery_bench_empty_exit(tracery_call *call, uint64_t cookie) {
  (void)call;
  (void)cookie;
}
__attribute__((aligned(64))) int tracery_bench_empty_modify_return(tracery_call *call, uint64_t cookie) {
  (void)call;
  (void)cookie;
  return 0;
}

__attribute__((aligned(64))) int tracery_bench_empty_graph_entry(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  (void)frame;
  (void)data;
  (void)call;
  (void)cookie;
  return 1;
}
__attribute__((aligned(64))) void tracery_bench_empty_graph_exit(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  (void)frame;
  (void)data;
  (void)call;
  (void)cookie;
}
__attribute__((aligned(64))) int tracery_bench_empty_fprobe_entry(uint64_t site, tracery_call *call, uint64_t *data, uint64_t cookie) {
  (void)site;
  (void)call;
  (void)data;
  (void)cookie;
  return 0;
}
__attribute__((aligned(64))) void tracery_bench_empty_fprobe_exit(uint64_t site, tracery_call *call, uint64_t *data, uint64_t cookie) {
  (void)site;
  (void)call;
  (void)data;
  (void)cookie;
}
