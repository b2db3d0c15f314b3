// A daemon's habit: change root (into argv[2], empty), optionally drop privileges (argv[1] ==
// "drop": to nobody), then start worker threads (argv[3] of them, at most 64; 4 by default)
// that make traced calls. Run as root.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
static void *run(void *arg) { return (void *)work((long)arg); }

int main(int argc, char **argv) {
  if (argc < 3) return 2;
  printf("before %ld\n", work(1000));
  if (chroot(argv[2]) != 0 || chdir("/") != 0) {
    perror("chroot");
    return 1;
  }
  if (strcmp(argv[1], "drop") == 0 && (setgid(65534) != 0 || setuid(65534) != 0)) {
    perror("setuid");
    return 1;
  }
  int count = argc > 3 ? atoi(argv[3]) : 4;
  if (count < 1 || count > 64) return 2;
  pthread_t threads[64];
  for (int i = 0; i < count; i++) pthread_create(&threads[i], NULL, run, (void *)1000);
  long sum = 0;
  for (int i = 0; i < count; i++) {
    void *result;
    pthread_join(threads[i], &result);
    sum += (long)result;
  }
  printf("after %ld %ld\n", work(1000), sum);
  return 0;
}
