// The bundled demo: a small program whose every function starts with a patch site when built as
// the package builds it (clang -fpatchable-function-entry=5). It recurses, runs two threads and
// forks a child, so `tracery live -- .build/debug/demo` shows each of them.
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

struct point {
  long x, y;
};

NOINLINE long fib(long n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

NOINLINE static long square(long x) { return x * x; }

NOINLINE long distance2(struct point a, struct point b) { return square(a.x - b.x) + square(a.y - b.y); }

NOINLINE double average(const long *values, int count) {
  double sum = 0;
  for (int i = 0; i < count; i++) sum += (double)values[i];
  return count ? sum / count : 0.0;
}

NOINLINE static int parse_number(const char *text, long *out) {
  char *end = 0;
  *out = strtol(text, &end, 10);
  return end != text && *end == '\0';
}

NOINLINE void report(const char *label, long value) { printf("%-10s %ld\n", label, value); }

struct job {
  long n, result;
};

NOINLINE static void *worker(void *argument) {
  struct job *job = argument;
  job->result = fib(job->n);
  return NULL;
}

/// Two threads, each computing a Fibonacci number.
NOINLINE static long run_threads(long n) {
  pthread_t threads[2];
  struct job jobs[2] = {{n - 1, 0}, {n - 2, 0}};
  for (int i = 0; i < 2; i++) pthread_create(&threads[i], NULL, worker, &jobs[i]);
  for (int i = 0; i < 2; i++) pthread_join(threads[i], NULL);
  return jobs[0].result + jobs[1].result;
}

NOINLINE static int child_work(long n) { return (int)(fib(n) % 256); }

/// A child process that computes fib(n) % 256 as its exit status.
NOINLINE static long run_child(long n) {
  fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) exit(child_work(n));
  int status = 0;
  waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int main(int argc, char **argv) {
  long n = 10;
  if (argc > 1 && !parse_number(argv[1], &n)) {
    fprintf(stderr, "usage: demo [N]\n");
    return 2;
  }
  long values[4] = {fib(n), fib(n / 2), distance2((struct point){1, 2}, (struct point){4, 6}), n};
  report("fib", values[0]);
  report("fib/2", values[1]);
  report("distance2", values[2]);
  printf("%-10s %.2f\n", "average", average(values, 4));
  report("threads", run_threads(n));
  report("child", run_child(n / 2));
  return 0;
}
