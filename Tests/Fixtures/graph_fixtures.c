#define _GNU_SOURCE
#include "graph_fixtures.h"
#include "fixtures.h"

#include <setjmp.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <ucontext.h>

#define TRACED __attribute__((patchable_function_entry(5, 0), noinline, noclone))

static jmp_buf escape;
static int escape_armed;

TRACED long tracery_graph_inner(long n) {
  if (escape_armed) {
    escape_armed = 0;
    longjmp(escape, 1);
  }
  __asm__ volatile("");
  return n + 3;
}
TRACED long tracery_graph_middle(long n) { return tracery_graph_inner(n) * 2; }
TRACED long tracery_graph_outer(long n) { return tracery_graph_middle(n) + 1; }
TRACED long tracery_graph_leaf(long n) { return n * 10; }

TRACED long tracery_graph_recurse(long depth) {
  if (depth <= 1) return 1;
  long below = tracery_graph_recurse(depth - 1);
  __asm__ volatile("" : : : "memory");
  return below + 1;
}

TRACED long tracery_graph_longjmp(long unused) {
  (void)unused;
  if (setjmp(escape) == 0) {
    escape_armed = 1;
    tracery_graph_outer(100);
    return -1;  // not reached
  }
  return tracery_graph_outer(1);
}

static struct tracery_graph_event events[256];
static int event_count;

void tracery_graph_events_reset(void) { event_count = 0; }
int tracery_graph_events_count(void) { return event_count; }
struct tracery_graph_event tracery_graph_event_at(int index) { return events[index]; }

static void record(int kind, tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  if (event_count >= 256) return;
  struct tracery_graph_event *event = &events[event_count++];
  event->kind = kind;
  event->cookie = cookie;
  event->site = frame->site;
  event->depth = frame->depth;
  event->data = data[0];
  event->return_value = kind == TRACERY_HANDLER_EXIT ? call->return_value[0] : call->arguments[0];
}

int tracery_graph_entry_record(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  data[0] = cookie * 1000 + frame->depth;
  record(TRACERY_HANDLER_ENTRY, frame, data, call, cookie);
  return 1;
}

void tracery_graph_exit_record(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  record(TRACERY_HANDLER_EXIT, frame, data, call, cookie);
}

int tracery_graph_entry_decline(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  record(TRACERY_HANDLER_ENTRY, frame, data, call, cookie);
  return 0;
}

static volatile long signal_result;
static void call_traced_from_handler(int signal) {
  (void)signal;
  signal_result = tracery_graph_outer(2);
}

/// A handler for `signal`, unblocked on this thread (the test runner's threads may block it);
/// `restore_signal` undoes both.
struct installed_signal {
  int signal;
  struct sigaction old;
  sigset_t previous;
};

static struct installed_signal install_signal(int signal, void (*handler)(int)) {
  struct installed_signal installed = {.signal = signal};
  struct sigaction action = {0};
  action.sa_handler = handler;
  action.sa_flags = SA_RESTART;
  sigaction(signal, &action, &installed.old);
  sigset_t unblock;
  sigemptyset(&unblock);
  sigaddset(&unblock, signal);
  pthread_sigmask(SIG_UNBLOCK, &unblock, &installed.previous);
  return installed;
}

static void restore_signal(struct installed_signal *installed) {
  pthread_sigmask(SIG_SETMASK, &installed->previous, 0);
  // A timer signal generated just before the timer stopped may still be on its way to another
  // thread: never let it meet the default action (which ends the process). Ignore it instead.
  if (installed->old.sa_handler == SIG_DFL) {
    struct sigaction ignore = {0};
    ignore.sa_handler = SIG_IGN;
    sigaction(installed->signal, &ignore, 0);
  } else {
    sigaction(installed->signal, &installed->old, 0);
  }
}

TRACED long tracery_graph_signal(long n) {
  struct installed_signal installed = install_signal(SIGUSR1, call_traced_from_handler);
  long before = tracery_graph_middle(n);
  raise(SIGUSR1);
  restore_signal(&installed);
  return before + signal_result;
}

static long counted_entries, counted_exits;
static volatile long timer_calls;

int tracery_graph_count_entry(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  (void)frame, (void)data, (void)call, (void)cookie;
  __atomic_fetch_add(&counted_entries, 1, __ATOMIC_RELAXED);
  return 1;
}

void tracery_graph_count_exit(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  (void)frame, (void)data, (void)call, (void)cookie;
  __atomic_fetch_add(&counted_exits, 1, __ATOMIC_RELAXED);
}

long tracery_graph_counted_entries(void) { return counted_entries; }
long tracery_graph_counted_exits(void) { return counted_exits; }

static void on_timer(int signal) {
  (void)signal;
  if (tracery_graph_leaf(1) == 10) timer_calls++;
}

long tracery_graph_signal_storm(long calls, long interval_us) {
  counted_entries = counted_exits = 0;
  timer_calls = 0;
  struct installed_signal installed = install_signal(SIGALRM, on_timer);
  struct itimerval timer = {{0, interval_us}, {0, interval_us}};
  setitimer(ITIMER_REAL, &timer, 0);
  long sum = 0;
  for (long index = 0; index < calls || timer_calls < 20; index++) sum += tracery_graph_outer(index & 7);
  struct itimerval off = {{0, 0}, {0, 0}};
  setitimer(ITIMER_REAL, &off, 0);
  restore_signal(&installed);
  return sum > 0 ? timer_calls : -1;
}

TRACED double tracery_graph_mix(long a, double x, long b, double y) { return (double)a * x + (double)b * y; }

static struct tracery_graph_seen seen;

void tracery_graph_seen_reset(void) { seen = (struct tracery_graph_seen){0}; }
struct tracery_graph_seen tracery_graph_seen_now(void) { return seen; }

static void clobber(void) {
  __asm__ volatile(
      "mov $-1, %%rax\n mov $-1, %%rcx\n mov $-1, %%rdx\n mov $-1, %%rsi\n mov $-1, %%rdi\n"
      "mov $-1, %%r8\n mov $-1, %%r9\n mov $-1, %%r10\n mov $-1, %%r11\n"
      "pcmpeqd %%xmm0, %%xmm0\n pcmpeqd %%xmm1, %%xmm1\n pcmpeqd %%xmm2, %%xmm2\n pcmpeqd %%xmm3, %%xmm3\n"
      "pcmpeqd %%xmm4, %%xmm4\n pcmpeqd %%xmm5, %%xmm5\n pcmpeqd %%xmm6, %%xmm6\n pcmpeqd %%xmm7, %%xmm7\n"
      :
      :
      : "rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4",
        "xmm5", "xmm6", "xmm7");
}

int tracery_graph_entry_clobber(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  (void)frame, (void)data, (void)cookie;
  seen.entry_arguments[0] = call->arguments[0];
  seen.entry_arguments[1] = call->arguments[1];
  __builtin_memcpy(&seen.entry_floats[0], &call->float_arguments[0][0], 8);
  __builtin_memcpy(&seen.entry_floats[1], &call->float_arguments[1][0], 8);
  seen.entries++;
  clobber();
  return 1;
}

void tracery_graph_exit_clobber(tracery_graph_frame *frame, uint64_t *data, tracery_call *call, uint64_t cookie) {
  (void)frame, (void)data, (void)cookie;
  seen.exit_argument = call->arguments[0];
  seen.exit_return = call->return_value[0];
  __builtin_memcpy(&seen.exit_float_return, &call->float_return[0][0], 8);
  seen.exits++;
  clobber();
}

// This thread's SIGUSR2 handler on a fresh 64 KiB alternate stack, and back.
struct alternate_stack {
  void *memory;
  size_t size;
  struct sigaction old;
};

static int enter_alternate_stack(struct alternate_stack *alternate, void (*handler)(int)) {
  alternate->size = 1 << 16;
  alternate->memory = mmap(0, alternate->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (alternate->memory == MAP_FAILED) return 0;
  stack_t stack = {.ss_sp = alternate->memory, .ss_size = alternate->size, .ss_flags = 0};
  sigaltstack(&stack, 0);
  struct sigaction action = {0};
  action.sa_handler = handler;
  action.sa_flags = SA_ONSTACK;
  sigaction(SIGUSR2, &action, &alternate->old);
  return 1;
}

static void leave_alternate_stack(struct alternate_stack *alternate) {
  sigaction(SIGUSR2, &alternate->old, 0);
  stack_t off = {.ss_flags = SS_DISABLE};
  sigaltstack(&off, 0);
  munmap(alternate->memory, alternate->size);
}

// A signal handler on an alternate stack above the thread's stack, calling traced functions
// while a traced call is live on the thread's stack (and, with `escape`, leaving by siglongjmp
// from a traced function on the alternate stack).
static sigjmp_buf alt_escape;
static volatile long alt_handler_result;
static volatile int alt_escape_wanted;

TRACED long tracery_graph_alt_escape(long n) {
  siglongjmp(alt_escape, 1);
  return n;  // not reached
}

static void on_alt_signal(int signal) {
  (void)signal;
  alt_handler_result = tracery_graph_leaf(2);
  if (alt_escape_wanted) tracery_graph_alt_escape(1);
}

TRACED long tracery_graph_alt_outer(long n) {
  if (sigsetjmp(alt_escape, 1) == 0) raise(SIGUSR2);
  return tracery_graph_middle(n) + alt_handler_result;
}

struct alt_run {
  long n;
  int escape;
  long result;
  int stacks_as_wanted;
};

static void *alt_thread(void *argument) {
  struct alt_run *run = argument;
  struct alternate_stack alternate;
  if (!enter_alternate_stack(&alternate, on_alt_signal)) return 0;
  int here;
  run->stacks_as_wanted = (uintptr_t)alternate.memory > (uintptr_t)&here;
  sigset_t unblock;
  sigemptyset(&unblock);
  sigaddset(&unblock, SIGUSR2);
  pthread_sigmask(SIG_UNBLOCK, &unblock, 0);
  alt_escape_wanted = run->escape;
  alt_handler_result = 0;
  run->result = tracery_graph_alt_outer(run->n);
  // Traced calls after it: frames the escape left on the shadow stack must not confuse them.
  run->result += tracery_graph_outer(1) * 1000;
  leave_alternate_stack(&alternate);
  return 0;
}

long tracery_graph_altstack(long n, int escape) {
  // The thread's stack low in the address space; its alternate stack, mapped later, above it.
  size_t size = 1 << 20;
  void *low = mmap((void *)0x100000000, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
  if (low == MAP_FAILED) return -1;
  pthread_attr_t attributes;
  pthread_attr_init(&attributes);
  pthread_attr_setstack(&attributes, low, size);
  struct alt_run run = {.n = n, .escape = escape};
  pthread_t thread;
  int created = pthread_create(&thread, &attributes, alt_thread, &run);
  if (created == 0) pthread_join(thread, 0);
  pthread_attr_destroy(&attributes);
  munmap(low, size);
  if (created != 0) return -2;
  return run.stacks_as_wanted ? run.result : -3;
}

// Coroutines (ucontext): a traced function suspended on a coroutine's stack while traced calls
// on the thread's stack start, end, and return past it.
static ucontext_t co_main, co_context;
static char co_stack[64 * 1024] __attribute__((aligned(16)));
static volatile long co_result;

TRACED long tracery_graph_co_inner(long n) {
  swapcontext(&co_context, &co_main);  // suspended here, its frame live
  return n + 1;
}

static void co_body(void) { co_result = tracery_graph_co_inner(40); }

TRACED long tracery_graph_co_start(long n) {
  getcontext(&co_context);
  co_context.uc_stack.ss_sp = co_stack;
  co_context.uc_stack.ss_size = sizeof co_stack;
  co_context.uc_link = &co_main;
  makecontext(&co_context, co_body, 0);
  swapcontext(&co_main, &co_context);  // back when co_inner yields
  return n * 2;
}

long tracery_graph_co_begin(long n) {
  co_result = 0;
  return tracery_graph_co_start(n);
}

long tracery_graph_co_finish(void) {
  swapcontext(&co_main, &co_context);
  return co_result;
}

long tracery_graph_coroutines(long n) {
  co_result = 0;
  long started = tracery_graph_co_start(n);  // returns while co_inner's frame lies above its own
  long middle = tracery_graph_middle(n);     // traced calls above the suspended frame
  swapcontext(&co_main, &co_context);        // co_inner returns, the coroutine ends
  return started + middle + co_result;
}

// Zeroes 8 KiB of stack below its caller: return addresses earlier calls left there (into
// generated code) are gone, so only live references keep that code busy.
static __attribute__((noinline)) void scrub_stack(void) {
  volatile char area[8192];
  for (unsigned index = 0; index < sizeof area; index++) area[index] = 0;
}

TRACED long tracery_graph_block(long value) {
  scrub_stack();
  return tracery_fixture_block(value);
}

// Ping-pong between the thread and a coroutine, each yielding from inside a traced call, so
// every traced return finds the other side's frame above its own (a rotation each time), while
// an interval timer's handler calls leaf(1) wherever it lands.
static ucontext_t ping_main, ping_context;
static char ping_stack[64 * 1024] __attribute__((aligned(16)));
static long ping_rounds;
static volatile long ping_sum_b, ping_timer_calls;

TRACED long tracery_graph_ping_a(long n) {
  swapcontext(&ping_main, &ping_context);
  return n + 1;
}

TRACED long tracery_graph_ping_b(long n) {
  swapcontext(&ping_context, &ping_main);
  return n + 2;
}

static void ping_body(void) {
  long sum = 0;
  for (long index = 0; index < ping_rounds; index++) sum += tracery_graph_ping_b(index) + tracery_graph_leaf(1);
  ping_sum_b = sum;
}

static void on_ping_timer(int signal) {
  (void)signal;
  if (tracery_graph_leaf(1) == 10) ping_timer_calls++;
}

long tracery_graph_ping_pong(long rounds, long interval_us, long *timer_calls) {
  ping_rounds = rounds;
  ping_sum_b = 0;
  ping_timer_calls = 0;
  getcontext(&ping_context);
  ping_context.uc_stack.ss_sp = ping_stack;
  ping_context.uc_stack.ss_size = sizeof ping_stack;
  ping_context.uc_link = &ping_main;
  makecontext(&ping_context, ping_body, 0);
  struct installed_signal installed = install_signal(SIGALRM, on_ping_timer);
  struct itimerval timer = {{0, interval_us}, {0, interval_us}};
  setitimer(ITIMER_REAL, &timer, 0);
  long sum_a = 0;
  for (long index = 0; index < rounds; index++) sum_a += tracery_graph_ping_a(index);
  swapcontext(&ping_main, &ping_context);  // the last ping_b returns; the coroutine ends
  struct itimerval off = {{0, 0}, {0, 0}};
  setitimer(ITIMER_REAL, &off, 0);
  restore_signal(&installed);
  *timer_calls = ping_timer_calls;
  return sum_a + ping_sum_b;
}

// A thread whose signal handler spins on its alternate stack while the code it interrupted is
// inside a traced function (a per-function trampoline's return address on the thread's stack).
static volatile int alt_spin_release, alt_spinning;
static pthread_t alt_spin_thread_handle;
static long alt_spin_result;

static void on_alt_spin(int signal) {
  (void)signal;
  alt_spinning = 1;
  while (!alt_spin_release) __asm__ volatile("pause");
  alt_spinning = 0;
}

TRACED long tracery_alt_spin_traced(long n) {
  raise(SIGUSR2);
  return n + 1;
}

static void *alt_spin_thread(void *argument) {
  long n = (long)argument;
  // Nothing blocked (the creating thread's mask is inherited; the reclaimer's snapshot signal
  // must reach this thread).
  sigset_t none;
  sigemptyset(&none);
  pthread_sigmask(SIG_SETMASK, &none, 0);
  struct alternate_stack alternate;
  if (!enter_alternate_stack(&alternate, on_alt_spin)) return 0;
  alt_spin_result = tracery_alt_spin_traced(n);
  leave_alternate_stack(&alternate);
  return 0;
}

int tracery_alt_spin_start(long n) {
  alt_spin_release = 0;
  alt_spinning = 0;
  return pthread_create(&alt_spin_thread_handle, 0, alt_spin_thread, (void *)n);
}

int tracery_alt_spinning(void) { return alt_spinning; }

long tracery_alt_spin_finish(void) {
  alt_spin_release = 1;
  pthread_join(alt_spin_thread_handle, 0);
  return alt_spin_result;
}

static pthread_t main_thread;

__attribute__((constructor)) static void remember_main_thread(void) { main_thread = pthread_self(); }

int tracery_main_thread_stack(uint64_t *low, uint64_t *high) {
  pthread_attr_t attributes;
  if (pthread_getattr_np(main_thread, &attributes) != 0) return -1;
  void *address;
  size_t size;
  int result = pthread_attr_getstack(&attributes, &address, &size);
  pthread_attr_destroy(&attributes);
  if (result != 0) return -1;
  *low = (uint64_t)address;
  *high = (uint64_t)address + size;
  return 0;
}
