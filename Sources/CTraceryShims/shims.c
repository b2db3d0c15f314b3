#define _GNU_SOURCE
#include "CTraceryShims.h"

#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/auxv.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <ucontext.h>
#include <time.h>
#include <unistd.h>

int ctracery_membarrier(int cmd, unsigned int flags) {
  return (int)syscall(SYS_membarrier, cmd, flags, 0);
}

unsigned long ctracery_getauxval(unsigned long type) { return getauxval(type); }

int ctracery_memfd_create(const char *name) { return (int)syscall(SYS_memfd_create, name, MFD_CLOEXEC); }

int ctracery_gettid(void) { return (int)syscall(SYS_gettid); }

static _Atomic(ctracery_catch_hook) catch_hook;

void ctracery_set_catch_hook(ctracery_catch_hook hook) { atomic_store(&catch_hook, hook); }

void *ctracery_next_symbol(const char *name, enum ctracery_symbol_home home) {
  static const char *const unwinders[] = {"libgcc_s.so.1", "libunwind.so.1", NULL};
  static const char *const runtimes[] = {"libstdc++.so.6", "libc++abi.so.1", "libc++.so.1", NULL};
  static const char *const math[] = {"libm.so.6", NULL};
  const char *const *libraries = home == CTRACERY_IN_UNWINDER ? unwinders : home == CTRACERY_IN_LIBM ? math : runtimes;
  void *found = dlsym(RTLD_NEXT, name);
  // First among those loaded (RTLD_NOLOAD), then, for the unwinder and libm, loading it.
  int passes = home == CTRACERY_IN_CXX_RUNTIME ? 1 : 2;
  for (int pass = 0; found == NULL && pass < passes; pass++) {
    for (const char *const *library = libraries; found == NULL && *library != NULL; library++) {
      void *handle = dlopen(*library, RTLD_LAZY | (pass == 0 ? RTLD_NOLOAD : 0));
      if (handle != NULL) found = dlsym(handle, name);
    }
  }
  return found;
}

// Interposes libstdc++'s __cxa_begin_catch (a program exporting this definition, or the preloaded
// agent, comes first in the lookup order). Written in C for the caller's exact stack pointer.
void *__cxa_begin_catch(void *exception) {
  static void *(*_Atomic next)(void *);
  void *(*forward)(void *) = atomic_load(&next);
  if (!forward) {
    // (A C++ library a C program opened with RTLD_LOCAL brings its runtime out of the global
    // scope, where RTLD_NEXT looks: its catch came here and called nothing.)
    forward = (void *(*)(void *))ctracery_next_symbol("__cxa_begin_catch", CTRACERY_IN_CXX_RUNTIME);
    if (!forward) abort();
    atomic_store(&next, forward);
  }
  ctracery_catch_hook hook = atomic_load(&catch_hook);
  if (hook) hook((uint64_t)__builtin_frame_address(0) + 16);
  return forward(exception);
}

void ctracery_xsave_layout(uint64_t *components, uint32_t *size) {
  *components = 0;
  *size = 0;
  unsigned eax, ebx, ecx, edx;
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(1), "c"(0));
  if (!(ecx & (1u << 27))) return;  // OSXSAVE: xsave and xgetbv usable
  unsigned low, high;
  __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
  // Leaf 13, subleaf 0: EBX is the save area's size for the components XCR0 enables.
  __asm__ volatile("cpuid" : "=a"(eax), "=b"(ebx), "=c"(ecx), "=d"(edx) : "a"(13), "c"(0));
  *components = ((uint64_t)high << 32) | low;
  *size = ebx;
}

uint64_t ctracery_xcr0(void) {
  unsigned low, high;
  __asm__ volatile("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
  return ((uint64_t)high << 32) | low;
}

void ctracery_store_release(uint64_t *word, uint64_t value) { __atomic_store_n(word, value, __ATOMIC_RELEASE); }

void ctracery_store_release_pairs(const uint64_t *pairs, size_t count) {
  for (size_t i = 0; i < count; i++) __atomic_store_n((uint64_t *)pairs[2 * i], pairs[2 * i + 1], __ATOMIC_RELEASE);
}

long ctracery_read_memory(void *buffer, const void *address, unsigned long size) {
  struct iovec local = {buffer, size};
  struct iovec remote = {(void *)address, size};
  return (long)process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
}

struct collect_state {
  struct ctracery_object *out;
  size_t capacity;
  size_t count;
};

static int collect_object(struct dl_phdr_info *info, size_t size, void *data) {
  (void)size;
  struct collect_state *state = data;
  if (state->count < state->capacity) {
    state->out[state->count].name = info->dlpi_name ? info->dlpi_name : "";
    state->out[state->count].bias = (uint64_t)info->dlpi_addr;
  }
  state->count += 1;
  return 0;
}

size_t ctracery_loaded_objects(struct ctracery_object *out, size_t capacity) {
  struct collect_state state = {out, capacity, 0};
  dl_iterate_phdr(collect_object, &state);
  return state.count;
}

// ---- SIGTRAP ---------------------------------------------------------------------------------

static _Atomic(const struct ctracery_poke_table *) published_table;
static _Atomic(const struct ctracery_poke_table *) published_traps;
static _Atomic uint64_t table_generation;
// The recursion guard (see ctracery_guard_offset): the signal handlers below hold it while they
// run, so that library functions they call (syscall, sigaltstack), traced when --patch reaches
// libraries, record nothing from inside them.
static __thread uint8_t recursion_guard __attribute__((tls_model("initial-exec")));

static atomic_long handlers_in_flight;
static _Atomic uint64_t traps_handled;
// The program's SIGTRAP disposition (the one ours replaced, then whatever the program sets:
// ctracery_program_trap_action), read and written under program_action_lock (a program may change
// it while another thread traps).
static struct sigaction previous_action;
static atomic_flag program_action_lock = ATOMIC_FLAG_INIT;
static atomic_int installed;
// Set once ours is the kernel's disposition; cleared when a trap not ours gets the default action.
static atomic_int in_place;

static struct sigaction program_action(void) {
  while (atomic_flag_test_and_set_explicit(&program_action_lock, memory_order_acquire)) {}
  struct sigaction action = previous_action;
  // One-shot (SA_RESETHAND): the program's handler runs once, then the default applies.
  if (action.sa_flags & SA_RESETHAND) {
    previous_action.sa_handler = SIG_DFL;
    previous_action.sa_flags &= ~(SA_RESETHAND | SA_SIGINFO);
  }
  atomic_flag_clear_explicit(&program_action_lock, memory_order_release);
  return action;
}

int ctracery_program_trap_action(const struct sigaction *action, struct sigaction *old) {
  if (!atomic_load(&in_place)) return 0;
  while (atomic_flag_test_and_set_explicit(&program_action_lock, memory_order_acquire)) {}
  if (old) *old = previous_action;
  if (action) previous_action = *action;
  atomic_flag_clear_explicit(&program_action_lock, memory_order_release);
  return 1;
}

// The first byte of every instruction the patcher writes: a trap at a site whose byte is now one
// of these was ours, and the patch completed before the handler ran.
static int is_patcher_opcode(uint8_t byte) {
  return byte == 0x0f /* nopl */ || byte == 0xe8 /* call */ || byte == 0xe9 /* jmp */ || byte == 0x90;
}

static const struct ctracery_poke *find_poke(const struct ctracery_poke_table *table, uint64_t site) {
  size_t low = 0, high = table->count;
  while (low < high) {
    size_t mid = low + (high - low) / 2;
    uint64_t at = table->pokes[mid].site;
    if (at == site) return &table->pokes[mid];
    if (at < site) low = mid + 1; else high = mid;
  }
  return NULL;
}

static void chain_to_previous(int sig, siginfo_t *info, void *context) {
  // Ours holds the snapshot signal off (see ctracery_install_trap_handler); the program's own
  // handler runs with it as the interrupted code had it (it may never return: longjmp).
  ucontext_t *uc = context;
  if (!sigismember(&uc->uc_sigmask, ctracery_snapshot_signal())) {
    sigset_t snapshot;
    sigemptyset(&snapshot);
    sigaddset(&snapshot, ctracery_snapshot_signal());
    pthread_sigmask(SIG_UNBLOCK, &snapshot, NULL);
  }
  struct sigaction action = program_action();
  if (!(action.sa_flags & SA_SIGINFO) && action.sa_handler == SIG_IGN) return;
  if (!(action.sa_flags & SA_SIGINFO) && action.sa_handler == SIG_DFL) {
    // The default action for SIGTRAP terminates with a core dump: do exactly that (ours no longer
    // in place, so that the agent's `signal` passes this through).
    atomic_store(&in_place, 0);
    signal(SIGTRAP, SIG_DFL);
    raise(SIGTRAP);
    return;
  }
  // The program's handler runs with its own mask added, as the kernel would run it.
  sigset_t mask;
  pthread_sigmask(SIG_BLOCK, &action.sa_mask, &mask);
  if (action.sa_flags & SA_SIGINFO) {
    action.sa_sigaction(sig, info, context);
  } else {
    action.sa_handler(sig);
  }
  pthread_sigmask(SIG_SETMASK, &mask, NULL);
}

static void answer_snapshot_after_trap(ucontext_t *uc);

static int handle_trap(siginfo_t *info, ucontext_t *uc);

static void trap_handler(int sig, siginfo_t *info, void *context) {
  uint8_t guard = recursion_guard;
  recursion_guard = 1;
  int handled = handle_trap(info, context);
  recursion_guard = guard;
  // Not ours: the program's handler runs as it would untraced (its calls traced as usual).
  if (!handled) chain_to_previous(sig, info, context);
}

// Whether the trap was a site's (the thread then resumes where the site sends it).
static int handle_trap(siginfo_t *info, ucontext_t *uc) {
  greg_t *gregs = uc->uc_mcontext.gregs;
  if (info->si_code == SI_KERNEL) {
    // T1: announce ourselves before looking at any table (pairs with the patcher's check of
    // in_flight before it frees retired tables).
    atomic_fetch_add_explicit(&handlers_in_flight, 1, memory_order_seq_cst);
    uint64_t site = (uint64_t)gregs[REG_RIP] - 1;
    int handled = 0;
    for (;;) {
      // T2: generation, table, byte, in this order. The patcher stores a table and then bumps
      // the generation before it writes any 0xCC, so a 0xCC we read that the table we loaded does
      // not explain means a batch began or ended meanwhile: the generation moved, try again.
      uint64_t generation = atomic_load_explicit(&table_generation, memory_order_seq_cst);
      const struct ctracery_poke_table *table = atomic_load_explicit(&published_table, memory_order_seq_cst);
      const struct ctracery_poke_table *traps = atomic_load_explicit(&published_traps, memory_order_seq_cst);
      uint8_t byte = __atomic_load_n((const uint8_t *)site, __ATOMIC_SEQ_CST);
      if (byte != 0xCC) {
        // The batch finished between the trap and now: run whatever is there now.
        if (is_patcher_opcode(byte) || (table && find_poke(table, site)) || (traps && find_poke(traps, site))) {
          gregs[REG_RIP] = (greg_t)site;
          handled = 1;
        }
        break;
      }
      const struct ctracery_poke *poke = table ? find_poke(table, site) : NULL;
      if (!poke && traps) {
        // A trap site: its int3 stays, and the table says where its branch would go.
        const struct ctracery_poke *trap = find_poke(traps, site);
        if (trap && trap->kind == CTRACERY_POKE_JMP) poke = trap;
      }
      if (poke) {
        // T3: emulate the instruction being installed.
        switch (poke->kind) {
        case CTRACERY_POKE_CALL:
          gregs[REG_RSP] -= 8;
          *(uint64_t *)gregs[REG_RSP] = site + 5;  // the end of the 5-byte call
          gregs[REG_RIP] = (greg_t)poke->target;
          break;
        case CTRACERY_POKE_JMP:
          gregs[REG_RIP] = (greg_t)poke->target;
          break;
        default:
          // The original code: it goes on at the site's resume address.
          gregs[REG_RIP] = (greg_t)poke->target;
          break;
        }
        handled = 1;
        break;
      }
      // A stable 0xCC that no batch placed: not ours.
      if (atomic_load_explicit(&table_generation, memory_order_seq_cst) == generation) break;
    }
    atomic_fetch_sub_explicit(&handlers_in_flight, 1, memory_order_seq_cst);
    if (handled) {
      atomic_fetch_add_explicit(&traps_handled, 1, memory_order_relaxed);
      answer_snapshot_after_trap(uc);
      return 1;
    }
  }
  return 0;
}

int ctracery_install_trap_handler(void) {
  int expected = 0;
  if (!atomic_compare_exchange_strong(&installed, &expected, 1)) return 0;
  struct sigaction action;
  memset(&action, 0, sizeof action);
  action.sa_sigaction = trap_handler;
  action.sa_flags = SA_SIGINFO | SA_RESTART | SA_ONSTACK;
  // The snapshot signal waits until this handler has returned: its frame holds the trapping
  // site + 1 as rip until then, which a relocation taking place would see as a thread inside the
  // bytes it moves (and give up on them). Deferred, it finds the thread where the handler sent
  // it, microseconds later.
  sigemptyset(&action.sa_mask);
  sigaddset(&action.sa_mask, ctracery_snapshot_signal());
  if (sigaction(SIGTRAP, &action, &previous_action) != 0) {
    atomic_store(&installed, 0);
    return -1;
  }
  atomic_store(&in_place, 1);
  return 0;
}

void ctracery_publish_pokes(const struct ctracery_poke_table *table) {
  atomic_store_explicit(&published_table, table, memory_order_seq_cst);
  atomic_fetch_add_explicit(&table_generation, 1, memory_order_seq_cst);
}

void ctracery_publish_traps(const struct ctracery_poke_table *table) {
  atomic_store_explicit(&published_traps, table, memory_order_seq_cst);
  atomic_fetch_add_explicit(&table_generation, 1, memory_order_seq_cst);
}

long ctracery_trap_handlers_in_flight(void) {
  return atomic_load_explicit(&handlers_in_flight, memory_order_seq_cst);
}

uint64_t ctracery_traps_handled(void) { return atomic_load_explicit(&traps_handled, memory_order_relaxed); }

// ---- Per-thread state --------------------------------------------------------------------------

long ctracery_guard_offset(void) {
  char *thread_pointer;
  __asm__("mov %%fs:0, %0" : "=r"(thread_pointer));
  return (long)((char *)&recursion_guard - thread_pointer);
}

uint8_t ctracery_guard_value(void) { return recursion_guard; }

uint8_t ctracery_swap_guard(uint8_t value) {
  uint8_t old = recursion_guard;
  recursion_guard = value;
  return old;
}

static __thread struct ctracery_thread thread_state __attribute__((tls_model("initial-exec")));

long ctracery_thread_offset(void) {
  char *thread_pointer;
  __asm__("mov %%fs:0, %0" : "=r"(thread_pointer));
  return (long)((char *)&thread_state - thread_pointer);
}

struct ctracery_thread *ctracery_thread_state(void) { return &thread_state; }

// Threads with a shadow stack, for the reclaimer (a frame's return-address slot may lie on a
// stack no thread is running on: a suspended coroutine's). Lock-free, so that a thread's first
// traced call may register it even inside a signal handler.
#define SHADOW_THREADS 4096
static _Atomic uint64_t shadow_threads[SHADOW_THREADS];
static atomic_int shadow_threads_full;

void ctracery_register_shadow_thread(struct ctracery_thread *state) {
  for (int index = 0; index < SHADOW_THREADS; index++) {
    uint64_t expected = 0;
    if (atomic_compare_exchange_strong(&shadow_threads[index], &expected, (uint64_t)state)) return;
  }
  atomic_store(&shadow_threads_full, 1);
}

void ctracery_unregister_shadow_thread(struct ctracery_thread *state) {
  for (int index = 0; index < SHADOW_THREADS; index++) {
    uint64_t expected = (uint64_t)state;
    if (atomic_compare_exchange_strong(&shadow_threads[index], &expected, 0)) return;
  }
}

long ctracery_shadow_threads(uint64_t *states, long capacity) {
  if (atomic_load(&shadow_threads_full)) return -1;
  long count = 0;
  for (int index = 0; index < SHADOW_THREADS && count < capacity; index++) {
    uint64_t state = atomic_load(&shadow_threads[index]);
    if (state != 0) states[count++] = state;
  }
  return count;
}

extern void *__libc_stack_end;

uint64_t ctracery_libc_stack_end(void) { return (uint64_t)__libc_stack_end; }

void ctracery_set_thread_stack(struct ctracery_thread *state) {
  state->stack_low = 0;
  state->stack_high = UINT64_MAX;
  pthread_attr_t attributes;
  if (pthread_getattr_np(pthread_self(), &attributes) != 0) return;
  void *address;
  size_t size;
  if (pthread_attr_getstack(&attributes, &address, &size) == 0) {
    state->stack_low = (uint64_t)address;
    state->stack_high = (uint64_t)address + size;
  }
  pthread_attr_destroy(&attributes);
}

// ---- Thread snapshots ----------------------------------------------------------------------------

static atomic_int snapshot_tid;
static _Atomic uint64_t snapshot_rip, snapshot_rsp;
static _Atomic uint64_t snapshot_registers[CTRACERY_SNAPSHOT_REGISTERS];
// The ucontext slots of rax ... r15 but rsp (a shared trampoline may hold a pointer it has
// loaded but not yet stored where the stack scan looks: see MultiEmitter's lookup).
static const int snapshot_register_slots[CTRACERY_SNAPSHOT_REGISTERS] = {
    REG_RAX, REG_RBX, REG_RCX, REG_RDX, REG_RSI, REG_RDI, REG_RBP, REG_R8,
    REG_R9,  REG_R10, REG_R11, REG_R12, REG_R13, REG_R14, REG_R15,
};
static atomic_int snapshot_done, snapshot_on_alternate_stack;
static atomic_int snapshot_installed;
static _Atomic(const struct ctracery_move_table *) published_moves;
static _Atomic uint64_t threads_moved;

// Answers the request for this thread, if there is one, with the context `uc` (which the thread
// resumes with). Claiming the request (its tid swapped for 0) makes the answer one handler's:
// the trap handler may answer, then the snapshot signal it held off arrive and find none.
static void answer_snapshot(ucontext_t *uc, int on_alternate_stack) {
  int tid = (int)syscall(SYS_gettid);
  if (!atomic_compare_exchange_strong_explicit(&snapshot_tid, &tid, 0, memory_order_acq_rel, memory_order_relaxed)) {
    return;
  }
  atomic_store_explicit(&snapshot_rip, (uint64_t)uc->uc_mcontext.gregs[REG_RIP], memory_order_relaxed);
  atomic_store_explicit(&snapshot_rsp, (uint64_t)uc->uc_mcontext.gregs[REG_RSP], memory_order_relaxed);
  for (int index = 0; index < CTRACERY_SNAPSHOT_REGISTERS; index++) {
    atomic_store_explicit(&snapshot_registers[index], (uint64_t)uc->uc_mcontext.gregs[snapshot_register_slots[index]],
                          memory_order_relaxed);
  }
  // Stopped at an instruction of a prologue being moved out of line: continue at its copy.
  const struct ctracery_move_table *moves = atomic_load_explicit(&published_moves, memory_order_acquire);
  if (moves != NULL) {
    uint64_t rip = (uint64_t)uc->uc_mcontext.gregs[REG_RIP];
    for (size_t index = 0; index < moves->count; index++) {
      if (moves->pairs[2 * index] != rip) continue;
      uc->uc_mcontext.gregs[REG_RIP] = (greg_t)moves->pairs[2 * index + 1];
      atomic_store_explicit(&snapshot_rip, moves->pairs[2 * index + 1], memory_order_relaxed);
      atomic_fetch_add_explicit(&threads_moved, 1, memory_order_relaxed);
      break;
    }
  }
  atomic_store_explicit(&snapshot_on_alternate_stack, on_alternate_stack, memory_order_relaxed);
  // Release: publishes rip and rsp; pairs with the acquire load in ctracery_snapshot_thread.
  atomic_store_explicit(&snapshot_done, 1, memory_order_release);
}

static _Atomic uint64_t calls_restarted;
static uint8_t sandboxed;

// A snapshot signal that reaches a thread as it enters (or sleeps in) a system call the kernel
// does not restart after a handler, even with SA_RESTART — nanosleep, clock_nanosleep, poll,
// ppoll, select, pselect6, epoll_wait, epoll_pwait(2), pause, rt_sigtimedwait — makes that call
// fail with EINTR, which the program would see although nothing of its own happened. The
// reclaimer signals only threads it saw running, but one can enter such a call before the
// signal lands. So the handler puts the call back: rip on the `syscall` instruction again and
// rax its number, which the kernel has overwritten with -EINTR, read from the `mov $NR, %eax`
// that precedes it (how Glibc, musl and compilers' inline system calls set it; any other shape
// is left alone). Arguments are in registers the kernel preserves. A relative timeout starts
// again whole (the sleep is longer, never shorter). Our signal is nearly always the cause: a
// program's handler run at the same return (its signal's number is lower, so it is delivered
// first) leaves our frame showing that handler, not the system call. The exception: a
// program's handler that blocks our signal (sa_mask full) and runs just as our request lands;
// our handler then runs as it returns, and its EINTR is put back too. That needs the thread to
// enter the call in the microseconds between the reclaimer's look and its signal *and* the
// program's signal then, where without the restart every entry in that window saw EINTR.
static void restart_interrupted_call(ucontext_t *uc) {
  greg_t *registers = uc->uc_mcontext.gregs;
  if (registers[REG_RAX] != -EINTR || sandboxed) return;
  uint8_t code[7];
  uint64_t rip = (uint64_t)registers[REG_RIP];
  if (ctracery_read_memory(code, (const void *)(rip - sizeof code), sizeof code) != (long)sizeof code) return;
  if (code[0] != 0xb8 || code[5] != 0x0f || code[6] != 0x05) return;
  uint32_t number;
  memcpy(&number, &code[1], sizeof number);
  switch (number) {
  case SYS_nanosleep:
  case SYS_clock_nanosleep:
  case SYS_poll:
  case SYS_ppoll:
  case SYS_select:
  case SYS_pselect6:
  case SYS_epoll_wait:
  case SYS_epoll_pwait:
  case 441: // SYS_epoll_pwait2 (newer than Glibc 2.36's headers)
  case SYS_pause:
  case SYS_rt_sigtimedwait:
    registers[REG_RAX] = (greg_t)number;
    registers[REG_RIP] = (greg_t)(rip - 2);
    atomic_fetch_add_explicit(&calls_restarted, 1, memory_order_relaxed);
    break;
  default:
    break;
  }
}

// The kernel's struct sigaction on x86-64 (glibc's differs: its mask is 128 bytes, its fields
// in another order, and its sigaction refuses the signals it reserves).
struct kernel_sigaction {
  uint64_t handler;
  uint64_t flags;
  uint64_t restorer;
  uint64_t mask;
};

int ctracery_signal_restorers(uint64_t *out, int capacity) {
  int count = 0;
  for (int signal = 1; signal <= 64; signal++) {
    struct kernel_sigaction action;
    if (syscall(SYS_rt_sigaction, signal, NULL, &action, sizeof action.mask) != 0 || action.restorer == 0) continue;
    int known = 0;
    for (int index = 0; index < count; index++) known |= out[index] == action.restorer;
    if (!known && count < capacity) out[count++] = action.restorer;
  }
  return count;
}

uint64_t ctracery_calls_restarted(void) { return atomic_load_explicit(&calls_restarted, memory_order_relaxed); }

static void snapshot_handler(int sig, siginfo_t *info, void *context) {
  (void)sig;
  (void)info;
  uint8_t guard = recursion_guard;
  recursion_guard = 1;
  restart_interrupted_call(context);
  // A late signal from an earlier, timed-out request finds no request, or another tid's.
  if (atomic_load_explicit(&snapshot_tid, memory_order_acquire) == (int)syscall(SYS_gettid)) {
    // Interrupted inside a signal handler running on its alternate stack: the stack it
    // interrupted in turn is somewhere else (sigaltstack is async-signal-safe). This handler
    // runs on the interrupted stack (no SA_ONSTACK).
    stack_t current;
    int alternate = sigaltstack(NULL, &current) == 0 && (current.ss_flags & SS_ONSTACK);
    answer_snapshot(context, alternate);
  }
  recursion_guard = guard;
}

// The end of a SIGTRAP handler that sent its thread on: a request for this thread (whose snapshot
// signal is held off while the handler runs) is answered with where the thread resumes. A thread
// that traps at every call would otherwise show the signal blocked nearly whenever its mask is
// read, and never be signalled.
static void answer_snapshot_after_trap(ucontext_t *uc) {
  if (atomic_load_explicit(&snapshot_tid, memory_order_acquire) == 0) return;
  stack_t alternate;
  uint64_t rsp = (uint64_t)uc->uc_mcontext.gregs[REG_RSP];
  int on = sigaltstack(NULL, &alternate) == 0 && !(alternate.ss_flags & SS_DISABLE) &&
           rsp > (uint64_t)alternate.ss_sp && rsp <= (uint64_t)alternate.ss_sp + alternate.ss_size;
  answer_snapshot(uc, on);
}

int ctracery_snapshot_signal(void) { return SIGRTMAX - 1; }

uint8_t *ctracery_sandboxed(void) { return &sandboxed; }

void ctracery_publish_moves(const struct ctracery_move_table *table) {
  atomic_store_explicit(&published_moves, table, memory_order_seq_cst);
}

uint64_t ctracery_threads_moved(void) { return atomic_load_explicit(&threads_moved, memory_order_relaxed); }

// One request at a time, whichever tracer or thread asks: the request is a single slot.
static pthread_mutex_t snapshot_request_lock = PTHREAD_MUTEX_INITIALIZER;

static int snapshot_thread_locked(int tid, uint64_t *rip, uint64_t *rsp, uint64_t *registers, int timeout_ms,
                                  int send_signal);

int ctracery_snapshot_thread(int tid, uint64_t *rip, uint64_t *rsp, uint64_t *registers, int timeout_ms,
                             int send_signal) {
  pthread_mutex_lock(&snapshot_request_lock);
  int answer = snapshot_thread_locked(tid, rip, rsp, registers, timeout_ms, send_signal);
  pthread_mutex_unlock(&snapshot_request_lock);
  return answer;
}

static int snapshot_thread_locked(int tid, uint64_t *rip, uint64_t *rsp, uint64_t *registers, int timeout_ms,
                                  int send_signal) {
  int expected = 0;
  if (atomic_compare_exchange_strong(&snapshot_installed, &expected, 1)) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = snapshot_handler;
    action.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&action.sa_mask);
    sigaction(ctracery_snapshot_signal(), &action, NULL);
  }
  atomic_store_explicit(&snapshot_done, 0, memory_order_relaxed);
  atomic_store_explicit(&snapshot_tid, tid, memory_order_release);
  if (send_signal && syscall(SYS_tgkill, getpid(), tid, ctracery_snapshot_signal()) != 0) {
    atomic_store(&snapshot_tid, 0);
    return -1;
  }
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    if (atomic_load_explicit(&snapshot_done, memory_order_acquire)) {
      *rip = atomic_load_explicit(&snapshot_rip, memory_order_relaxed);
      *rsp = atomic_load_explicit(&snapshot_rsp, memory_order_relaxed);
      for (int index = 0; index < CTRACERY_SNAPSHOT_REGISTERS; index++) {
        registers[index] = atomic_load_explicit(&snapshot_registers[index], memory_order_relaxed);
      }
      return atomic_load_explicit(&snapshot_on_alternate_stack, memory_order_relaxed) ? 1 : 0;
    }
    clock_gettime(CLOCK_MONOTONIC, &now);
    long elapsed = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
    if (elapsed > timeout_ms) {
      // Withdrawn, unless a handler has just claimed it: then its answer is moments away.
      int claimed = tid;
      if (atomic_compare_exchange_strong(&snapshot_tid, &claimed, 0)) return -1;
      while (!atomic_load_explicit(&snapshot_done, memory_order_acquire)) sched_yield();
      continue;
    }
    sched_yield();
  }
}

uint64_t ctracery_rdtsc(void) {
  uint32_t low, high;
  __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
  return ((uint64_t)high << 32) | low;
}

void *ctracery_object_base(const void *address) {
  Dl_info info;
  return dladdr(address, &info) != 0 ? info.dli_fbase : NULL;
}
