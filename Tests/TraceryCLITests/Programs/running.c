// A long-running multi-threaded program to attach to (`record -p`), built with patch sites:
// two threads busy in loops of traced calls (each checks every loop against the same chain
// computed inline), one blocked in read() on a pipe, one in nanosleep. It prints "ready" once
// all run; when its stdin closes it stops the threads and prints whether every loop checked
// out, and how many of its calls saw EINTR (none should: attaching must not interrupt a system
// call the program can see).
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static atomic_int stop;
static atomic_long interrupted;
static int pipe_ends[2];

__attribute__((noinline)) unsigned long step(unsigned long x) { return x * 6364136223846793005ul + 1442695040888963407ul; }
__attribute__((noinline)) unsigned long mix(unsigned long x, int i) { return step(x ^ (unsigned long)i) >> 1; }

struct busy {
  unsigned long seed, loops, wrong;
};

// Each loop computes the same chain twice, through the traced calls and inline: a traced call
// that changed a register or a result shows as a wrong loop.
static void *busy(void *argument) {
  struct busy *work = argument;
  unsigned long x = work->seed;
  while (!atomic_load(&stop)) {
    unsigned long traced = x, inline_ = x;
    for (int i = 0; i < 1000; i++) {
      traced = mix(traced, i);
      inline_ = ((inline_ ^ (unsigned long)i) * 6364136223846793005ul + 1442695040888963407ul) >> 1;
    }
    if (traced != inline_) work->wrong++;
    x = traced;
    work->loops++;
  }
  return NULL;
}

static void *reader(void *unused) {
  (void)unused;
  char byte;
  for (;;) {
    ssize_t count = read(pipe_ends[0], &byte, 1);
    if (count < 0 && errno == EINTR) {
      atomic_fetch_add(&interrupted, 1);
      continue;
    }
    return NULL;
  }
}

static void *sleeper(void *unused) {
  (void)unused;
  while (!atomic_load(&stop)) {
    struct timespec wait = {0, 20 * 1000 * 1000};
    if (nanosleep(&wait, NULL) != 0 && errno == EINTR) atomic_fetch_add(&interrupted, 1);
  }
  return NULL;
}

static struct busy work[2] = {{1, 0, 0}, {2, 0, 0}};
static pthread_t threads[4];

// Waits for stdin to close, stops the threads, says whether every loop checked out, and exits.
static void *finish(void *unused) {
  (void)unused;
  char line[64];
  while (fgets(line, sizeof line, stdin) != NULL) {
  }
  if (ferror(stdin) && errno == EINTR) atomic_fetch_add(&interrupted, 1);
  atomic_store(&stop, 1);
  close(pipe_ends[1]);
  for (int i = 0; i < 4; i++) pthread_join(threads[i], NULL);
  int good = 0;
  for (int i = 0; i < 2; i++) good += work[i].wrong == 0 && work[i].loops > 0;
  printf("checksums %s, interrupted %ld\n", good == 2 ? "ok" : "WRONG", atomic_load(&interrupted));
  fflush(stdout);
  exit(good == 2 ? 0 : 1);
}

// With the argument `exit-main`, the main thread leaves by pthread_exit once the others run (it
// stays a zombie thread, which ptrace cannot stop): a fifth thread waits for stdin instead.
int main(int argc, char **argv) {
  // Started from a shell, a program's signal mask is empty; started by the test runner it would
  // inherit the runner's (which blocks real-time signals).
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  if (pipe(pipe_ends) != 0) return 1;
  pthread_create(&threads[0], NULL, busy, &work[0]);
  pthread_create(&threads[1], NULL, busy, &work[1]);
  pthread_create(&threads[2], NULL, reader, NULL);
  pthread_create(&threads[3], NULL, sleeper, NULL);
  printf("ready\n");
  fflush(stdout);
  if (argc > 1 && strcmp(argv[1], "exit-main") == 0) {
    pthread_t waiter;
    pthread_create(&waiter, NULL, finish, NULL);
    pthread_exit(NULL);
  }
  finish(NULL);
}
