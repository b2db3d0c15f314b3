// A JIT's conventions in miniature: code Tracery does not know calls a traced function, whose
// return address must stay where its caller put it (V8 reads the return addresses of its own
// frames, and dies on one that is not its code's: node under `tracery record`). Two such
// callers: a page of anonymous memory (a JIT's compiled code) and, unless an argument is given,
// 64 KiB of the program's own text that no call frame describes (V8's embedded builtins).
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>

static uintptr_t expected_low, expected_high;
static int wrong, calls;

__attribute__((noinline)) long checked(long x) {
  uintptr_t back = (uintptr_t)__builtin_return_address(0);
  if (expected_high != 0 && (back < expected_low || back >= expected_high)) wrong++;
  calls++;
  return x + 1;
}

__asm__(".text\n.globl builtins\n.type builtins, @function\nbuiltins:\n  .skip 65536, 0x90\n"
        "  sub $8, %rsp\n  call checked\n  add $8, %rsp\n  ret\n.size builtins, .-builtins\n"
        ".globl builtins_end\nbuiltins_end:\n");
long builtins(long x);
extern char builtins_end[];

int main(int argc, char **argv) {
  (void)argv;
  long sum = 0;
  for (int i = 0; i < 3; i++) sum += checked(argc + i);
  // sub $8, %rsp; movabs $checked, %rax; call *%rax; add $8, %rsp; ret
  unsigned char code[] = {0x48, 0x83, 0xec, 0x08, 0x48, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0,
                          0xff, 0xd0, 0x48, 0x83, 0xc4, 0x08, 0xc3};
  uintptr_t target = (uintptr_t)checked;
  memcpy(code + 6, &target, sizeof target);
  unsigned char *page = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (page == MAP_FAILED) return 2;
  memcpy(page, code, sizeof code);
  if (mprotect(page, 4096, PROT_READ | PROT_EXEC) != 0) return 2;
  long (*jitted)(long) = (long (*)(long))page;
  expected_low = (uintptr_t)page;
  expected_high = expected_low + 4096;
  for (int i = 0; i < 5; i++) sum += jitted(argc + i);
  if (argc == 1) {
    expected_low = (uintptr_t)builtins;
    expected_high = (uintptr_t)builtins_end;
    for (int i = 0; i < 7; i++) sum += builtins(argc + i);
  }
  expected_high = 0;
  printf("calls %d wrong %d sum %ld\n", calls, wrong, sum);
  return wrong != 0;
}
