// A function written in assembly without call frame information (as V8's 2,182 builtins in node
// are: generated code with conventions of its own) beside compiled ones. Built as programs ship
// (-O2), it is recorded without it. Prints 42.
#include <stdio.h>

__asm__(".text\n"
        ".globl handmade\n"
        ".type handmade, @function\n"
        "handmade:\n"
        "  leaq 1(%rdi), %rax\n"
        "  nop\n"
        "  nop\n"
        "  nop\n"
        "  ret\n"
        ".size handmade, .-handmade\n");

long handmade(long x);

__attribute__((noinline)) long compiled(long x) { return handmade(x) * 2; }

int main(void) {
  printf("%ld\n", compiled(20));
  return 0;
}
