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

// The same body without a NOP (as programs ship): its first instructions (push rbp; mov rbp,
// rsp; lea) are relocated, and the copy jumps back to the rest.
__attribute__((aligned(64), noinline)) long tracery_bench_plain_target(long x) { return x + 1; }

// 4 bytes (`mov rax, rdi; ret`) and another function right after them, no padding between:
// too short to relocate, traced through an int3. (In assembly: this target is built with frame
// pointers, whose push and mov would make room to relocate; and a short function followed by
// padding moves whole.)
__asm__(".text\n.p2align 6\n.globl tracery_bench_short_target\n.type tracery_bench_short_target, @function\n"
        "tracery_bench_short_target:\n  mov %rdi, %rax\n  ret\n"
        ".size tracery_bench_short_target, .-tracery_bench_short_target\n"
        ".globl tracery_bench_short_neighbour\n.type tracery_bench_short_neighbour, @function\n"
        "tracery_bench_short_neighbour:\n  mov %rdi, %rax\n  ret\n"
        ".size tracery_bench_short_neighbour, .-tracery_bench_short_neighbour\n");

__attribute__((aligned(64))) long tracery_bench_loop_calling(long (*function)(long), long iterations) {
  long (*volatile target)(long) = function;
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

// The empty handlers' counting twins: each adds 1 to the word its cookie points at (a bench's
// proof that its handlers ran once per call).
void tracery_bench_counting_entry(tracery_call *call, uint64_t cookie) {
  (void)call;
  ++*(uint64_t *)cookie;
}
void tracery_bench_counting_exit(tracery_call *call, uint64_t cookie) {
  (void)call;
  ++*(uint64_t *)cookie;
}
int tracery_bench_counting_modify_return(tracery_call *call, uint64_t cookie) {
  (void)call;
  ++*(uint64_t *)cookie;
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
