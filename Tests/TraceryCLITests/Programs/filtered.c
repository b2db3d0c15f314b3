// Runs under a seccomp filter that allows every system call (as sandboxed programs do, with
// stricter ones): `record -p` must refuse it, not find out by killing it. Exits when stdin closes.
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <sys/prctl.h>

__attribute__((noinline)) int work(int x) { return x + 1; }

int main(void) {
  struct sock_filter allow[] = {BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)};
  struct sock_fprog program = {1, allow};
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program) != 0) return 1;
  printf("ready %d\n", work(0));
  fflush(stdout);
  while (getchar() != EOF) {
  }
  return 0;
}
