// Built as programs ship (-O2): a worker thread blocks every signal, then calls functions the
// 5-byte branch does not fit as they are. `tiny` (4 bytes) is followed by the compiler's
// alignment padding, so it moves whole under `record --relocate`; `loops` branches back into its
// first 5 bytes, and `packed` (4 bytes) has another function right after it (relocated in the
// same batch), so both are traced through an int3. The last two are written in assembly to have
// those shapes. Prints 1498501.
#include <pthread.h>
#include <signal.h>
#include <stdio.h>

__attribute__((noinline)) long tiny(long x) { return x; }

// Both return x (x >= 0): `loops` by counting up to it, from a loop whose head is at +2.
long loops(long x);
long packed(long x);
__asm__(".text\n"
        ".p2align 4\n"
        ".globl loops\n"
        ".type loops, @function\n"
        "loops:\n"
        ".cfi_startproc\n"
        "  xor %eax, %eax\n"
        "1:\n"
        "  cmp %rdi, %rax\n"
        "  je 2f\n"
        "  add $1, %rax\n"
        "  jmp 1b\n"
        "2:\n"
        "  ret\n"
        ".cfi_endproc\n"
        ".size loops, .-loops\n"
        ".p2align 4\n"
        ".globl packed\n"
        ".type packed, @function\n"
        "packed:\n"
        ".cfi_startproc\n"
        "  mov %rdi, %rax\n"
        "  ret\n"
        ".cfi_endproc\n"
        ".size packed, .-packed\n"
        ".globl neighbour\n"
        ".type neighbour, @function\n"
        "neighbour:\n"
        ".cfi_startproc\n"
        "  lea 2(%rdi), %rax\n"
        "  ret\n"
        ".cfi_endproc\n"
        ".size neighbour, .-neighbour\n");

static void *worker(void *argument) {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, 0);
  long sum = (long)argument;
  for (long i = 0; i < 1000; i++) sum += tiny(i) + loops(i) + packed(i);
  return (void *)sum;
}

int main(void) {
  pthread_t thread;
  void *result;
  pthread_create(&thread, 0, worker, (void *)0);
  pthread_join(thread, &result);
  printf("%ld\n", (long)result + tiny(1));
  return 0;
}
