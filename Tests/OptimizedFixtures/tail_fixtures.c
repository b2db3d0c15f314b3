#include "tail_fixtures.h"

#include <setjmp.h>
#include <string.h>

#define TRACED __attribute__((noinline))
#define UNTRACED __attribute__((noinline, patchable_function_entry(0, 0)))

TRACED long tracery_tail_leaf(long x) { return 3 * x + 1; }
TRACED long tracery_tail_mid(long x) { return tracery_tail_leaf(x + 1); }
TRACED long tracery_tail_top(long x) { return tracery_tail_mid(2 * x); }
TRACED long tracery_tail_outer(long x) {
  long result = tracery_tail_top(x);
  __asm__ volatile("" : "+r"(result));
  return result + 1000;
}

UNTRACED long tracery_tail_bridge(long x) { return tracery_tail_leaf(x * 5); }
TRACED long tracery_tail_via(long x) { return tracery_tail_bridge(x + 2); }

TRACED long tracery_tail_odd(long n);
TRACED long tracery_tail_even(long n) { return n == 0 ? 1 : tracery_tail_odd(n - 1); }
TRACED long tracery_tail_odd(long n) { return n == 0 ? 0 : tracery_tail_even(n - 1); }

static jmp_buf escape;
TRACED long tracery_tail_jumper_leaf(long x) {
  if (x > 0) longjmp(escape, 1);
  return 2 * x;
}
TRACED long tracery_tail_jumper_mid(long x) { return tracery_tail_jumper_leaf(x + 1); }
TRACED long tracery_tail_longjmp(long x) {
  volatile long argument = x;
  if (setjmp(escape) == 0) {
    tracery_tail_jumper_mid(argument);
    return -1;  // not reached
  }
  return tracery_tail_leaf(argument);
}

// Swift's async convention: each returns with `ret 8`; `run` takes 8 off rsp after its call.
#define ASYNC __attribute__((swiftasynccall))
#define CONTEXT __attribute__((swift_async_context))
TRACED ASYNC void tracery_async_leaf(long *CONTEXT box) {
  __asm__ volatile("" ::: "memory");
  box[0] += 3;
}
TRACED ASYNC void tracery_async_mid(long *CONTEXT box) {
  box[0] += 2;
  __attribute__((musttail)) return tracery_async_leaf(box);
}
TRACED long tracery_async_run(long x) {
  long box[1] = {x};
  tracery_async_mid(box);
  return box[0];
}
UNTRACED ASYNC void tracery_async_plain_leaf(long *CONTEXT box) {
  long value = box[0];
  __asm__ volatile("" : "+r"(value));
  box[0] = value + 3;
}
UNTRACED ASYNC void tracery_async_plain_mid(long *CONTEXT box) {
  long value = box[0];
  __asm__ volatile("" : "+r"(value));
  box[0] = value + 2;
  __attribute__((musttail)) return tracery_async_plain_leaf(box);
}
UNTRACED long tracery_async_plain_run(long x) {
  long box[1] = {x};
  tracery_async_plain_mid(box);
  __asm__ volatile("" ::: "memory");
  return box[0];
}
// mover: an async function with two stack arguments (its caller leaves 24 bytes for it to
// pop) that adds the first to the box and tail-calls plain_leaf (which pops 8) as Swift does:
// the return address copied 16 bytes up, rsp after it, `jmp`.
__asm__(".text\n"
        ".globl tracery_async_mover\n"
        ".type tracery_async_mover, @function\n"
        "tracery_async_mover:\n"
        "  mov (%rsp), %rax\n"
        "  mov %rax, 16(%rsp)\n"
        "  mov 8(%rsp), %rax\n"
        "  add %rax, (%r14)\n"
        "  add $16, %rsp\n"
        "  jmp tracery_async_plain_leaf\n"
        ".size tracery_async_mover, .-tracery_async_mover\n");

// grower: an async function without stack arguments that tail-calls the mover, which takes two:
// the return address copied 16 bytes down, rsp with it, the arguments (2 and 0) above it, `jmp`
// (Swift's tail call to a callee with more stack arguments); the mover moves it back up.
__asm__(".text\n"
        ".globl tracery_async_grower\n"
        ".type tracery_async_grower, @function\n"
        "tracery_async_grower:\n"
        "  mov (%rsp), %rax\n"
        "  mov %rax, -16(%rsp)\n"
        "  sub $16, %rsp\n"
        "  movq $2, 8(%rsp)\n"
        "  movq $0, 16(%rsp)\n"
        "  jmp tracery_async_mover\n"
        ".size tracery_async_grower, .-tracery_async_grower\n");

// checked_call(x, callee, argument, popped): callee(box of x; argument, 0 on the stack) called as
// Swift's executor calls an async function (rsp 16-byte aligned at the call, `popped` bytes of
// stack arguments left for it to pop, rsp put back after it), with a live word of its own right
// above them: -1 if the call changed it, else the box.
__asm__(".text\n"
        ".globl tracery_async_checked_call\n"
        ".type tracery_async_checked_call, @function\n"
        "tracery_async_checked_call:\n"
        "  push %r14\n"
        "  push %rbx\n"
        "  mov %rcx, %rbx\n"
        "  sub $24, %rsp\n"
        "  mov %rdi, 8(%rsp)\n"
        "  movabs $0x5a5a5a5a12345678, %rax\n"
        "  mov %rax, (%rsp)\n"
        "  lea 8(%rsp), %r14\n"
        "  sub $32, %rsp\n"
        "  mov %rdx, (%rsp)\n"
        "  movq $0, 8(%rsp)\n"
        "  call *%rsi\n"
        "  add $32, %rsp\n"
        "  sub %rbx, %rsp\n"
        "  movabs $0x5a5a5a5a12345678, %rax\n"
        "  cmp %rax, (%rsp)\n"
        "  jne 1f\n"
        "  mov 8(%rsp), %rax\n"
        "  jmp 2f\n"
        "1:\n"
        "  mov $-1, %rax\n"
        "2:\n"
        "  add $24, %rsp\n"
        "  pop %rbx\n"
        "  pop %r14\n"
        "  ret\n"
        ".size tracery_async_checked_call, .-tracery_async_checked_call\n");

const void *tracery_async_functions(int plain, const void **mid, const void **leaf) {
  *mid = plain ? (const void *)tracery_async_plain_mid : (const void *)tracery_async_mid;
  *leaf = plain ? (const void *)tracery_async_plain_leaf : (const void *)tracery_async_leaf;
  return plain ? (const void *)tracery_async_plain_run : (const void *)tracery_async_run;
}

int tracery_tail_jumps(const void *from, const void *to, int length) {
  const unsigned char *code = from;
  for (int offset = 0; offset + 5 <= length; offset++) {
    if (code[offset] != 0xe9) continue;
    int displacement;
    memcpy(&displacement, code + offset + 1, 4);
    if (code + offset + 5 + displacement == (const unsigned char *)to) return 1;
  }
  return 0;
}
