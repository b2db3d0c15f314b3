// Removes its own trace directory (argv[1]) while it is being recorded, then goes on working:
// calls, a new thread (whose event file can no longer be made), output, exit status 3.
#include <pthread.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) long work(long n) { return n < 2 ? n : work(n - 1) + work(n - 2); }

static void *thread_main(void *argument) {
  (void)argument;
  work(15);
  return 0;
}

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  long before = work(20);
  pid_t child = fork();
  if (child == 0) {
    execl("/bin/rm", "rm", "-rf", argv[1], (char *)0);
    _exit(127);
  }
  int status = 0;
  waitpid(child, &status, 0);
  pthread_t thread;
  pthread_create(&thread, 0, thread_main, 0);
  pthread_join(thread, 0);
  printf("%ld %ld %d\n", before, work(20), WEXITSTATUS(status));
  return 3;
}
