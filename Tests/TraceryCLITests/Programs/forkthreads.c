// Two threads busy in traced calls while a third forks twenty children, one after another, each
// making a thousand traced calls of its own before _exit. Prints "ok" when every child's sum was
// right.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long work(long x) { return x * 3 + 1; }

static void *spin(void *argument) {
  (void)argument;
  long sum = 0;
  for (long i = 0; i < 300000; i++) sum += work(i);
  return (void *)sum;
}

static void *forker(void *argument) {
  (void)argument;
  for (int i = 0; i < 20; i++) {
    pid_t pid = fork();
    if (pid == 0) {
      long sum = 0;
      for (int k = 0; k < 1000; k++) sum += work(k);
      _exit(sum == 1499500 ? 0 : 1);
    }
    int status;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
      printf("child %d failed\n", i);
      exit(1);
    }
  }
  return 0;
}

int main(void) {
  pthread_t threads[3];
  pthread_create(&threads[0], 0, spin, 0);
  pthread_create(&threads[1], 0, spin, 0);
  pthread_create(&threads[2], 0, forker, 0);
  for (int i = 0; i < 3; i++) pthread_join(threads[i], 0);
  printf("ok\n");
  return 0;
}
