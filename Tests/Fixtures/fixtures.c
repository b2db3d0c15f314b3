#include "fixtures.h"

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define TRACED __attribute__((patchable_function_entry(5, 0), noinline, used))

TRACED long tracery_fixture_add(long a, long b) { return a + b; }
TRACED long tracery_fixture_mul3(long a) { return a * 3; }
TRACED long tracery_fixture_mix(long a, long b, long c, long d, long e, long f) {
  return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f;
}
TRACED long tracery_fixture_sub(long a, long b) { return a - b; }

static atomic_int stop_flag;
static _Atomic uint64_t total_calls, total_wrong;
static pthread_t threads[16];
static int thread_count;

static void unblock_signals(void) {
  // Threads created from a libdispatch worker inherit its blocked signals; an ordinary program
  // thread blocks none, and the trampoline reclaimer needs its snapshot signal to get through.
  sigset_t none;
  sigemptyset(&none);
  pthread_sigmask(SIG_SETMASK, &none, 0);
}

static void *hammer(void *arg) {
  unblock_signals();
  long seed = (long)(intptr_t)arg;
  uint64_t calls = 0, wrong = 0;
  // Calls through volatile pointers so the compiler keeps every call.
  long (*volatile add)(long, long) = tracery_fixture_add;
  long (*volatile mul3)(long) = tracery_fixture_mul3;
  long (*volatile mix)(long, long, long, long, long, long) = tracery_fixture_mix;
  long (*volatile sub)(long, long) = tracery_fixture_sub;
  while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
    for (long i = 0; i < 1000; i++) {
      long x = seed + i;
      wrong += add(x, 7) != x + 7;
      wrong += mul3(x) != x * 3;
      wrong += mix(x, 1, 2, 3, 4, 5) != x + 2 + 6 + 12 + 20 + 30;
      wrong += sub(x, 5) != x - 5;
      calls += 4;
    }
  }
  atomic_fetch_add(&total_calls, calls);
  atomic_fetch_add(&total_wrong, wrong);
  return 0;
}

void tracery_fixture_hammers_start(int count) {
  atomic_store(&stop_flag, 0);
  atomic_store(&total_calls, 0);
  atomic_store(&total_wrong, 0);
  thread_count = count > 16 ? 16 : count;
  for (int i = 0; i < thread_count; i++) pthread_create(&threads[i], 0, hammer, (void *)(intptr_t)(i * 1000003));
}

uint64_t tracery_fixture_hammers_stop(uint64_t *wrong) {
  atomic_store(&stop_flag, 1);
  for (int i = 0; i < thread_count; i++) pthread_join(threads[i], 0);
  thread_count = 0;
  *wrong = atomic_load(&total_wrong);
  return atomic_load(&total_calls);
}

// ---- Functions of every argument and return shape ----
#include <execinfo.h>
#include <stdarg.h>
#include <string.h>
#include <unistd.h>

TRACED long tracery_fixture_six(long a, long b, long c, long d, long e, long f) {
  return a * 100000 + b * 10000 + c * 1000 + d * 100 + e * 10 + f;
}
TRACED double tracery_fixture_floats(double a, double b, long c, double d) { return a * 100 + b * 10 + (double)c + d / 10; }
TRACED long tracery_fixture_varargs(int count, ...) {
  va_list list;
  va_start(list, count);
  long sum = 0;
  for (int i = 0; i < count; i++) sum += (long)(va_arg(list, double) * 10);
  va_end(list);
  return sum;
}
TRACED long tracery_fixture_eight(long a, long b, long c, long d, long e, long f, long g, long h) {
  return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h;
}
TRACED struct tracery_pair tracery_fixture_pair(long a, long b) { return (struct tracery_pair){a + b, a - b}; }
TRACED double tracery_fixture_double(long a) { return (double)a / 4; }
TRACED long tracery_fixture_calls_add(long a) { return tracery_fixture_add(a, 1) * 2; }

static atomic_int release_flag, blocked_flag;
TRACED long tracery_fixture_block(long value) {
  atomic_store(&blocked_flag, 1);
  while (!atomic_load(&release_flag)) usleep(1000);
  atomic_store(&blocked_flag, 0);
  atomic_store(&release_flag, 0);
  return value + 1;
}
void tracery_fixture_release(void) { atomic_store(&release_flag, 1); }
int tracery_fixture_blocked(void) { return atomic_load(&blocked_flag); }

TRACED long tracery_fixture_backtrace_depth(long unused) {
  (void)unused;
  void *frames[64];
  return backtrace(frames, 64);
}

// ---- Recording handlers ----
struct tracery_fixture_record tracery_fixture_records[64];
int tracery_fixture_record_count;

void tracery_fixture_records_reset(void) {
  memset(tracery_fixture_records, 0, sizeof tracery_fixture_records);
  tracery_fixture_record_count = 0;
}

static void record(tracery_call *call, uint64_t cookie, int kind) {
  if (tracery_fixture_record_count >= 64) return;
  struct tracery_fixture_record *r = &tracery_fixture_records[tracery_fixture_record_count++];
  r->function = call->function;
  r->cookie = cookie;
  r->return_address = call->return_address;
  memcpy(r->arguments, call->arguments, sizeof r->arguments);
  memcpy(r->return_value, call->return_value, sizeof r->return_value);
  for (int i = 0; i < 8; i++) memcpy(&r->float_arguments[i], call->float_arguments[i], sizeof(double));
  memcpy(&r->float_return, call->float_return[0], sizeof(double));
  r->stack_arguments[0] = call->stack_arguments[0];
  r->stack_arguments[1] = call->stack_arguments[1];
  r->kind = kind;
}

void tracery_fixture_entry_record(tracery_call *call, uint64_t cookie) { record(call, cookie, TRACERY_HANDLER_ENTRY); }
void tracery_fixture_exit_record(tracery_call *call, uint64_t cookie) { record(call, cookie, TRACERY_HANDLER_EXIT); }
int tracery_fixture_modify_record(tracery_call *call, uint64_t cookie) {
  record(call, cookie, TRACERY_HANDLER_MODIFY_RETURN);
  if (cookie == 0) return 0;
  call->return_value[0] = cookie;
  return 1;
}
void tracery_fixture_entry_set_arg0(tracery_call *call, uint64_t cookie) { call->arguments[0] = cookie; }
void tracery_fixture_entry_clobber(tracery_call *call, uint64_t cookie) {
  (void)call;
  (void)cookie;
  __asm__ volatile(
      "xor %%eax, %%eax; mov $-1, %%rcx; mov $-1, %%rdx; mov $-1, %%rsi; mov $-1, %%rdi; mov $-1, %%r8;"
      "mov $-1, %%r9; mov $-1, %%r10; mov $-1, %%r11; pcmpeqd %%xmm0, %%xmm0; pcmpeqd %%xmm1, %%xmm1;"
      "pcmpeqd %%xmm2, %%xmm2; pcmpeqd %%xmm3, %%xmm3; pcmpeqd %%xmm4, %%xmm4; pcmpeqd %%xmm5, %%xmm5;"
      "pcmpeqd %%xmm6, %%xmm6; pcmpeqd %%xmm7, %%xmm7"
      ::: "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4",
      "xmm5", "xmm6", "xmm7", "memory");
}
void tracery_fixture_entry_reenter(tracery_call *call, uint64_t cookie) {
  (void)call;
  (void)cookie;
  double (*volatile traced)(long) = tracery_fixture_double;
  traced(8);
}
void tracery_fixture_empty_handler(tracery_call *call, uint64_t cookie) {
  (void)call;
  (void)cookie;
}
int tracery_fixture_records_count(void) { return tracery_fixture_record_count; }
struct tracery_fixture_record tracery_fixture_record_at(int index) { return tracery_fixture_records[index]; }
void *tracery_fixture_varargs_address(void) { return (void *)tracery_fixture_varargs; }
long tracery_fixture_varargs_call(void) {
  long (*volatile varargs)(int, ...) = tracery_fixture_varargs;
  return varargs(3, 1.5, 2.5, 3.5);
}
static int handler_depth;
void tracery_fixture_entry_backtrace(tracery_call *call, uint64_t cookie) {
  (void)call;
  (void)cookie;
  void *frames[64];
  handler_depth = backtrace(frames, 64);
}
int tracery_fixture_handler_depth(void) { return handler_depth; }

static void *tracer_hammer(void *arg) {
  unblock_signals();
  long seed = (long)(intptr_t)arg;
  uint64_t calls = 0, wrong = 0;
  long (*volatile six)(long, long, long, long, long, long) = tracery_fixture_six;
  double (*volatile floats)(double, double, long, double) = tracery_fixture_floats;
  struct tracery_pair (*volatile pair)(long, long) = tracery_fixture_pair;
  while (!atomic_load_explicit(&stop_flag, memory_order_relaxed)) {
    for (long i = 0; i < 1000; i++) {
      long x = (seed + i) % 9;
      wrong += six(x, 1, 2, 3, 4, 5) != x * 100000 + 12345;
      wrong += floats(1.0, 2.0, x, 5.0) != 100.0 + 20.0 + (double)x + 0.5;
      struct tracery_pair p = pair(x, 3);
      wrong += p.low != x + 3 || p.high != x - 3;
      calls += 3;
    }
  }
  atomic_fetch_add(&total_calls, calls);
  atomic_fetch_add(&total_wrong, wrong);
  return 0;
}

void tracery_fixture_tracer_hammers_start(int count) {
  atomic_store(&stop_flag, 0);
  atomic_store(&total_calls, 0);
  atomic_store(&total_wrong, 0);
  thread_count = count > 16 ? 16 : count;
  for (int i = 0; i < thread_count; i++) pthread_create(&threads[i], 0, tracer_hammer, (void *)(intptr_t)(i * 7));
}

static atomic_int spinner_stop;
static pthread_t spinner_thread;
static void *spinner(void *arg) {
  (void)arg;
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, 0);
  while (!atomic_load_explicit(&spinner_stop, memory_order_relaxed)) {
  }
  return 0;
}
void tracery_fixture_spinner_start(void) {
  atomic_store(&spinner_stop, 0);
  pthread_create(&spinner_thread, 0, spinner, 0);
}
void tracery_fixture_spinner_stop(void) {
  atomic_store(&spinner_stop, 1);
  pthread_join(spinner_thread, 0);
}

/* A thread that holds one address (8 bytes past the masked base it is given) in r12 only, as a
   global trampoline holds a record between its load and its hazard store. The loop is assembly:
   a compiler may keep any C variable on the stack as well. */
static volatile int holder_stop, holder_holding;
static pthread_t holder_thread;
static uint64_t holder_masked;
static void *holder(void *arg) {
  (void)arg;
  sigset_t none;
  sigemptyset(&none);
  pthread_sigmask(SIG_SETMASK, &none, 0);
  uint64_t masked = holder_masked;
  __asm__ volatile(
      "movabs $0x5a5a5a5a5a5a5a5a, %%r12\n\t"
      "xor %0, %%r12\n\t"
      "add $8, %%r12\n\t"
      "movl $1, %1\n\t"
      "1: pause\n\t"
      "cmpl $0, %2\n\t"
      "je 1b\n\t"
      "xor %%r12, %%r12\n\t"
      :
      : "r"(masked), "m"(holder_holding), "m"(holder_stop)
      : "r12", "memory", "cc");
  return 0;
}
void tracery_fixture_holder_start(uint64_t masked_base) {
  holder_masked = masked_base;
  holder_stop = 0;
  holder_holding = 0;
  pthread_create(&holder_thread, 0, holder, 0);
  while (!holder_holding) sched_yield();
}
void tracery_fixture_holder_stop(void) {
  holder_stop = 1;
  pthread_join(holder_thread, 0);
}

// 4 bytes without a NOP, and another function right after them: too short to relocate (a trap
// site when traced; followed by padding instead, it would move whole). In assembly: this file is
// built with frame pointers, whose push and mov would make room to relocate.
#define SHORT_FUNCTION(name)                                                                            \
  __asm__(".text\n.p2align 4\n.globl " #name "\n.type " #name ", @function\n" #name ":\n  mov %rdi, %rax\n" \
          "  ret\n.size " #name ", .-" #name "\n.globl " #name "_neighbour\n.type " #name "_neighbour, @function\n" #name \
          "_neighbour:\n  mov %rdi, %rax\n  ret\n.size " #name "_neighbour, .-" #name "_neighbour\n")
SHORT_FUNCTION(tracery_fixture_short);
// The same, for a test that runs beside the one using the first (a site has one tracer).
SHORT_FUNCTION(tracery_fixture_short_other);

int tracery_fixture_sleep_in(int call, int milliseconds, int *error) {
  sigset_t none;
  sigemptyset(&none);
  pthread_sigmask(SIG_SETMASK, &none, NULL);
  int result = -1;
  errno = 0;
  switch (call) {
  case 0: {
    struct timespec wait = {milliseconds / 1000, (long)(milliseconds % 1000) * 1000000};
    result = nanosleep(&wait, NULL);
    break;
  }
  case 1:
    result = poll(NULL, 0, milliseconds);
    break;
  case 2: {
    int epoll = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event event;
    result = epoll_wait(epoll, &event, 1, milliseconds);
    int saved = errno;
    close(epoll);
    errno = saved;
    break;
  }
  case 3: {
    struct timeval wait = {milliseconds / 1000, (long)(milliseconds % 1000) * 1000};
    result = select(0, NULL, NULL, NULL, &wait);
    break;
  }
  }
  *error = errno;
  return result;
}

static void program_signal_handler(int signal) { (void)signal; }

int tracery_fixture_send_program_signal(int tid) {
  struct sigaction action = {0};
  action.sa_handler = program_signal_handler;
  action.sa_flags = SA_RESTART;
  sigemptyset(&action.sa_mask);
  sigaction(SIGRTMIN + 3, &action, NULL);
  return (int)syscall(SYS_tgkill, getpid(), tid, SIGRTMIN + 3);
}
