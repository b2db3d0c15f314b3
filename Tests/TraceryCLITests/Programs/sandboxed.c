// A program that sandboxes itself with seccomp, as OpenSSH's and browsers' sandboxes do: after
// the filter, any system call it does not list kills the whole process. A worker thread records
// while the filter goes in (TSYNC: every thread gets it), runs on, and exits under it.
// Argument: "prctl" installs the filter on the calling thread alone through prctl; "sshd" too,
// after lowering the file-size limit to 0 and the descriptor limit to 1, as OpenSSH's sandboxed
// child does (a write that grows a file then raises SIGXFSZ), and leaving by _exit; else
// syscall(SYS_seccomp, ..., TSYNC).
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))
NOINLINE long leaf(long x) { return x * 3 + 1; }
NOINLINE long work(long n) {
  long s = 0;
  for (long i = 0; i < n; i++) {
    s += leaf(i);
    __asm__ volatile("" : "+r"(s));
  }
  return s;
}

static atomic_int stop, started;
static void *worker(void *arg) {
  (void)arg;
  long rounds = 0;
  atomic_store(&started, 1);
  while (!atomic_load(&stop)) {
    work(1000);
    rounds++;
  }
  return (void *)rounds;
}

#define ALLOW(nr) BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1), BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)

int main(int argc, char **argv) {
  int likeSshd = argc > 1 && strcmp(argv[1], "sshd") == 0;
  int viaPrctl = likeSshd || (argc > 1 && strcmp(argv[1], "prctl") == 0);
  printf("before %ld\n", work(1000));
  fflush(stdout);
  pthread_t thread;
  if (!viaPrctl) {
    pthread_create(&thread, NULL, worker, NULL);
    while (!atomic_load(&started)) usleep(100);
    usleep(2000);
  }
  struct sock_filter filter[] = {
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
      ALLOW(__NR_read), ALLOW(__NR_write), ALLOW(__NR_exit), ALLOW(__NR_exit_group), ALLOW(__NR_brk),
      ALLOW(__NR_futex), ALLOW(__NR_madvise), ALLOW(__NR_newfstatat), ALLOW(__NR_fstat), ALLOW(__NR_rt_sigreturn),
      ALLOW(__NR_rt_sigprocmask),  // a thread's exit blocks signals
      BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
  };
  struct sock_fprog program = {sizeof(filter) / sizeof(filter[0]), filter};
  if (likeSshd) {
    struct rlimit none = {0, 0}, one = {1, 1};
    if (setrlimit(RLIMIT_FSIZE, &none) != 0 || setrlimit(RLIMIT_NOFILE, &one) != 0) return 4;
  }
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return 1;
  long installed = viaPrctl ? prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &program)
                            : syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &program);
  if (installed != 0) return 2;
  long after = work(300000);
  if (!viaPrctl) {
    atomic_store(&stop, 1);
    void *rounds;
    pthread_join(thread, &rounds);
    if ((long)rounds <= 0) return 3;
  }
  printf("after %ld\n", after);
  // OpenSSH's sandboxed child leaves by _exit: the filter allows exit_group and little else.
  if (likeSshd) {
    fflush(stdout);
    _exit(0);
  }
  return 0;
}
