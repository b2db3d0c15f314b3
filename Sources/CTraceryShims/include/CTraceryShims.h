// C shims for what Swift cannot say on Linux: variadic syscall(2), getauxval, dl_iterate_phdr's
// callback, and the SIGTRAP handler that edits a ucontext. Names are prefixed `ctracery_`.
#ifndef CTRACERY_SHIMS_H
#define CTRACERY_SHIMS_H

#include <stdint.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifdef __cplusplus
extern "C" {
#endif

/// MAP_FIXED_NOREPLACE, which Glibc's Swift module does not export.
static const int ctracery_MAP_FIXED_NOREPLACE = 0x100000;

/// membarrier(2). Returns the syscall's result; -1 with errno set on failure.
int ctracery_membarrier(int cmd, unsigned int flags);
/// getauxval(3).
unsigned long ctracery_getauxval(unsigned long type);
/// memfd_create(2) with MFD_CLOEXEC.
int ctracery_memfd_create(const char *name);
/// gettid(2).
int ctracery_gettid(void);
/// renameat2(2) with RENAME_NOREPLACE (1; glibc declares neither for Swift): -1 with errno
/// EEXIST when `to` exists, ENOENT when `from` does not. Inline: TraceryRecord calls it, and its
/// fuzzing build (scripts/fuzz.sh) compiles that module's sources with this header only.
static inline int ctracery_rename_noreplace(int from_directory, const char *from, int to_directory, const char *to) {
  return (int)syscall(SYS_renameat2, from_directory, from, to_directory, to, 1);
}

/// O_TMPFILE (020000000 | O_DIRECTORY), which Glibc's Swift module does not export: an unnamed
/// file in a directory, made without holding that directory's lock.
static const int ctracery_O_TMPFILE = 020000000 | 0200000;

/// lseek's SEEK_DATA and SEEK_HOLE, which Glibc's Swift module does not export.
static const int ctracery_SEEK_DATA = 3;
static const int ctracery_SEEK_HOLE = 4;

/// Where `ctracery_next_symbol` looks beyond the global scope: the unwinder (libgcc_s, LLVM's
/// libunwind; loaded when none is), the C++ runtime (libstdc++, libc++abi, libc++), or libm
/// (loaded when not yet).
enum ctracery_symbol_home { CTRACERY_IN_UNWINDER = 0, CTRACERY_IN_CXX_RUNTIME = 1, CTRACERY_IN_LIBM = 2 };
/// The definition of `name` after this object's in the lookup order (`dlsym(RTLD_NEXT)`); else the
/// one in the first library of `home` already loaded: a library a program opened with RTLD_LOCAL
/// keeps its dependencies out of the global scope, where RTLD_NEXT looks (a C program's C++
/// plugin: its libstdc++ and libgcc_s); else, for the unwinder and libm, in the first one that
/// loads now (an exception thrown inside the agent where no unwinder is loaded; the agent's first
/// call of a libm function in a program without libm). NULL if none has it.
void *ctracery_next_symbol(const char *name, enum ctracery_symbol_home home);

/// libm's rounding (ceil, floor, trunc, round; double and float) without libm, for the agent's
/// own definitions of them (CTraceryAgent's libm.c: the agent does not load libm). The integer
/// conversion truncates exactly where a fraction can exist (|x| below 2^52, 2^23 for float;
/// above, every value is whole); the sign is put back so that -0.5 rounds up to -0.0 as libm
/// does. Rounding to nearest takes halves away from zero (`round`); `x - trunc(x)` is exact.
enum ctracery_rounding { CTRACERY_ROUND_UP, CTRACERY_ROUND_DOWN, CTRACERY_ROUND_TOWARD_ZERO, CTRACERY_ROUND_NEAREST };
static inline double ctracery_round_double(double x, enum ctracery_rounding rounding) {
  if (!(__builtin_fabs(x) < 0x1p52)) return x;  // whole, infinite or NaN
  double whole = (double)(long long)x;
  switch (rounding) {
    case CTRACERY_ROUND_UP: whole += whole < x ? 1.0 : 0.0; break;
    case CTRACERY_ROUND_DOWN: whole -= whole > x ? 1.0 : 0.0; break;
    case CTRACERY_ROUND_TOWARD_ZERO: break;
    case CTRACERY_ROUND_NEAREST: whole += __builtin_fabs(x - whole) >= 0.5 ? __builtin_copysign(1.0, x) : 0.0; break;
  }
  return __builtin_copysign(whole, x);
}
static inline float ctracery_round_float(float x, enum ctracery_rounding rounding) {
  if (!(__builtin_fabsf(x) < 0x1p23f)) return x;
  float whole = (float)(int)x;
  switch (rounding) {
    case CTRACERY_ROUND_UP: whole += whole < x ? 1.0f : 0.0f; break;
    case CTRACERY_ROUND_DOWN: whole -= whole > x ? 1.0f : 0.0f; break;
    case CTRACERY_ROUND_TOWARD_ZERO: break;
    case CTRACERY_ROUND_NEAREST: whole += __builtin_fabsf(x - whole) >= 0.5f ? __builtin_copysignf(1.0f, x) : 0.0f; break;
  }
  return __builtin_copysignf(whole, x);
}

/// Called by the `__cxa_begin_catch` interposer (shims.c) with the catching function's stack
/// pointer, before the exception is handed to it: the function graph puts its return addresses
/// back into the frames that survived the unwind. Set once by TraceryCore.
typedef void (*ctracery_catch_hook)(uint64_t catcher_stack_pointer);
void ctracery_set_catch_hook(ctracery_catch_hook hook);

/// An atomic 64-bit store with release ordering (also a compiler barrier), into memory Swift
/// cannot hold as an `Atomic` (words shared with handlers on other threads).
void ctracery_store_release(uint64_t *word, uint64_t value);
/// Release-stores `count` words: `pairs` holds (address, value) pairs, one after the other.
void ctracery_store_release_pairs(const uint64_t *pairs, size_t count);

/// Copies up to `size` bytes at `address` of this process into `buffer` without faulting on an
/// unmapped address (process_vm_readv, which Glibc's Swift module lacks). Returns the bytes
/// copied (fewer at the end of a mapping), or -1.
long ctracery_read_memory(void *buffer, const void *address, unsigned long size);

/// One object of the running process, as dl_iterate_phdr reports it.
struct ctracery_object {
  /// The object's path as the dynamic loader has it; "" for the main program.
  const char *name;
  /// Load bias: runtime address = link-time address + bias.
  uint64_t bias;
};
/// Fills `out` with up to `capacity` loaded objects and returns how many there are in all
/// (which may exceed `capacity`: call again with more room). Names stay valid while the object
/// stays loaded.
size_t ctracery_loaded_objects(struct ctracery_object *out, size_t capacity);

// ---------------------------------------------------------------------------------------------
// The SIGTRAP side of the live patcher (the kernel's smp_text_poke_int3_handler).
//
// While a batch is in flight the patcher publishes a table of the sites it is rewriting, sorted
// by address. A thread that executes an int3 the patcher placed traps here; the handler finds its
// site and emulates the instruction being installed, so the thread never runs a half-written one.
//
// Protocol (patcher thread | trapping thread):
//   P1 store table, then generation += 1  | T1 in_flight += 1
//   P2 write 0xCC at every site ...       | T2 load generation, both tables, then the byte at
//   ...                                   |    rip-1
//   Pn store NULL, then generation += 1   | T3 emulate if the batch table (else the trap table,
//                                         |    `ctracery_publish_traps`) has the site; rewind if
//                                         |    the byte is no longer 0xCC; retry if the generation
//                                         |    moved; else chain. Then in_flight -= 1.
//   A retired table is freed only after the patcher has seen in_flight == 0 after retiring it.
// (All of these are sequentially consistent.) A trap whose byte is no longer 0xCC (the patch
// finished before the handler ran) re-executes the instruction now there (rip -= 1) when that
// byte is one the patcher writes or the trap table names the site. Any other trap goes to the
// handler installed before ours.
// ---------------------------------------------------------------------------------------------

enum ctracery_poke_kind {
  /// Continue at target, the site's resume address (the new bytes are the original code: for a
  /// NOP site, site + 5).
  CTRACERY_POKE_SKIP = 0,
  /// Push site + 5 and continue at target (the new instruction is `call target`).
  CTRACERY_POKE_CALL = 1,
  /// Continue at target (the new instruction is `jmp target`).
  CTRACERY_POKE_JMP = 2,
  /// Only in the trap table: the site's own code is back (a trap site or a relocated one was
  /// restored); a thread that trapped on the int3 before it went re-executes the site.
  CTRACERY_POKE_REWIND = 3,
};

struct ctracery_poke {
  uint64_t site;
  uint64_t target;
  uint64_t kind;
};

struct ctracery_poke_table {
  const struct ctracery_poke *pokes;  // sorted by site, ascending
  size_t count;
};

/// The processor state `xsave` saves in this process: the components the kernel enabled (XCR0;
/// x87, SSE, AVX's upper halves, AVX-512's opmasks and upper registers) and the size of their
/// save area. 0 and 0 when the processor or the kernel offers no `xsave`.
void ctracery_xsave_layout(uint64_t *components, uint32_t *size);
/// XCR0, the state components the kernel enabled for `xsave` (`xgetbv` 0; only where OSXSAVE is
/// set, as `ctracery_xsave_layout` found when it gave a size).
uint64_t ctracery_xcr0(void);

/// Installs the SIGTRAP handler once (later calls do nothing). Returns 0 or -1 with errno.
int ctracery_install_trap_handler(void);
struct sigaction;
/// Once the SIGTRAP handler is installed, the program's own SIGTRAP disposition is kept here
/// instead of replacing it (the agent's `sigaction` and `signal` call this; LLVM's crash handler,
/// for one, installs a SIGTRAP handler at start, and the int3 sites would then reach it): stores
/// `action` (unless NULL) after copying the previous one to `old` (unless NULL), and returns 1.
/// Traps that are not the tracer's go to that disposition. Returns 0 (nothing done) while the
/// handler is not installed.
int ctracery_program_trap_action(const struct sigaction *action, struct sigaction *old);
/// Publishes `table` (NULL to unpublish), then advances the table generation.
void ctracery_publish_pokes(const struct ctracery_poke_table *table);
/// Publishes the trap table (NULL for none), then advances the table generation: the sites that
/// keep an int3 (kind JMP: a trap site, `PatchSite.Shape.trap`, continues at target) and those
/// whose original code came back over one (kind REWIND). A trap at a site whose byte is 0xCC and
/// that no batch explains is emulated from it; a trap whose byte is no longer 0xCC rewinds when
/// the site is in it (any original byte, not only the patcher's opcodes). Retired like a batch's
/// table: freed only once no handler is in flight.
void ctracery_publish_traps(const struct ctracery_poke_table *table);
/// Number of SIGTRAP handlers currently between T1 and T3.
long ctracery_trap_handlers_in_flight(void);
/// Traps the handler emulated or rewound since the process started (for tests and statistics).
uint64_t ctracery_traps_handled(void);

// ---------------------------------------------------------------------------------------------
// Thread snapshots for the trampoline reclaimer (the user-space form of RCU-tasks).
//
// The reclaimer frees a retired trampoline only when no thread executes it or holds an address
// inside it on its stack or in a register. For a thread that is running user code it needs that
// thread's registers: it sends CTRACERY_SNAPSHOT_SIGNAL, whose handler copies them from the
// ucontext and acknowledges. One request at a time (a lock in the shim: any tracer may ask).

/// The signal used for snapshots: SIGRTMAX - 1.
int ctracery_snapshot_signal(void);
/// Set once the program installs a seccomp filter (the agent's `prctl`/`syscall` interposers):
/// from then on Tracery makes no system call of its own in this process (the filter may kill
/// the process for one it does not list). Generated code reads the byte at this address before
/// it blocks signals around a refill or a thread's set-up.
uint8_t *ctracery_sandboxed(void);
/// The load address of the object that holds `address` (`dladdr`'s `dli_fbase`: Glibc's module
/// lacks `Dl_info`), or NULL.
void *ctracery_object_base(const void *address);
/// The general-purpose registers a snapshot reports besides rip and rsp (rax ... r15 but rsp).
#define CTRACERY_SNAPSHOT_REGISTERS 15
/// Asks thread `tid` for its rip, rsp and other general-purpose registers (`registers`:
/// CTRACERY_SNAPSHOT_REGISTERS words) and waits up to `timeout_ms`. With `send_signal` it sends the
/// snapshot signal; without, only the end of the SIGTRAP handler answers (the handler holds the
/// signal off, so a thread inside it shows the signal blocked: it answers with where it resumes).
/// Returns 0 on success, 1 when the thread was running a signal handler on its alternate stack
/// (the registers are set, but the stack it interrupted is elsewhere), -1 if the thread did not
/// answer (it may have exited or block the signal).
int ctracery_snapshot_thread(int tid, uint64_t *rip, uint64_t *rsp, uint64_t *registers, int timeout_ms,
                             int send_signal);

/// Instruction moves for prologues being relocated while threads run: `pairs` holds `count`
/// (from, to) addresses, an instruction inside a site's first 5 bytes and the same instruction in
/// its copy. While a table is published, a snapshot of a thread stopped at a `from` moves it to
/// its `to` (and reports that rip). Published and unpublished by the patcher, between writing its
/// int3s and the branch's other bytes.
struct ctracery_move_table {
  const uint64_t *pairs;
  size_t count;
};
void ctracery_publish_moves(const struct ctracery_move_table *table);
/// Threads moved so far (for tests).
uint64_t ctracery_threads_moved(void);
/// System calls a snapshot signal interrupted and the handler put back (see shims.c), so far.
uint64_t ctracery_calls_restarted(void);
/// The distinct signal-return addresses (`sa_restorer`) of this process's signal actions, as the
/// kernel holds them (every signal, those glibc reserves included), up to `capacity`; returns how
/// many. The first word of every signal frame the kernel builds on x86-64 is one of them.
int ctracery_signal_restorers(uint64_t *out, int capacity);

// ---------------------------------------------------------------------------------------------
// Per-thread state that generated code reads and writes at a fixed %fs offset.

/// The offset from the thread pointer (%fs:0) of this thread's recursion guard byte: generated
/// code tests and sets `byte fs:[offset]`. The variable is initial-exec TLS, so the offset is the
/// same in every thread.
long ctracery_guard_offset(void);
/// The time-stamp counter.
uint64_t ctracery_rdtsc(void);
/// This thread's guard byte (for tests).
uint8_t ctracery_guard_value(void);
/// Sets this thread's guard byte (held around handlers that Swift code calls); returns the old.
uint8_t ctracery_swap_guard(uint8_t value);

/// Per-thread state of the function graph and its event recorder, read and written by generated
/// code at `fs:[ctracery_thread_offset() + field offset]` (initial-exec TLS: one offset for
/// every thread). Only the owning thread touches its struct, except that `TraceryCore` reads
/// `dropped` and `overflowed` after the thread is gone.
struct ctracery_thread {
  /// Next free shadow frame; 0 until the thread's shadow stack is set up.
  uint64_t shadow_top;
  /// First address past the shadow stack (0 until set up: `top >= limit` takes the slow path).
  uint64_t shadow_limit;
  /// The recorder's next free event slot and the end of its current chunk.
  uint64_t event_cursor;
  uint64_t event_end;
  /// Events the recorder could not store (no chunk to move to).
  uint64_t dropped;
  /// Calls not traced because the shadow stack was full.
  uint64_t overflowed;
  /// Start of the shadow stack mapping (its sentinel frame) and its size in bytes.
  uint64_t shadow_base;
  uint64_t shadow_size;
  /// For the recorder's owner (the agent's per-thread buffer).
  uint64_t owner;
  /// The thread's own stack: [stack_low, stack_high). A traced call whose stack pointer lies
  /// outside runs on another stack (a signal handler's alternate stack): frames are never taken
  /// for stale from there. 0 and UINT64_MAX when unknown.
  uint64_t stack_low;
  uint64_t stack_high;
  /// The cursor as the recorder read it before taking an event's time: a signal handler that
  /// recorded events between that and the event's reservation moved it (see GraphEmitter's
  /// `putRecord`).
  uint64_t event_mark;
  /// Calls the function graph left untraced because their caller's return address lay in no
  /// known code (`KnownCode`: a JIT's code), counted by the graph entry's cold path.
  uint64_t foreign_calls;
};
long ctracery_thread_offset(void);
struct ctracery_thread *ctracery_thread_state(void);
/// The threads whose shadow stacks the reclaimer reads: registered when a thread's shadow stack
/// is set up, unregistered before it is freed (lock-free: async-signal-safe).
void ctracery_register_shadow_thread(struct ctracery_thread *state);
void ctracery_unregister_shadow_thread(struct ctracery_thread *state);
/// Copies up to `capacity` registered states; -1 when a registration found no room (then some
/// thread's frames cannot be read).
long ctracery_shadow_threads(uint64_t *states, long capacity);
/// Sets `stack_low` and `stack_high` to the calling thread's stack (pthread_getattr_np, a GNU
/// function the Swift Glibc module does not show).
void ctracery_set_thread_stack(struct ctracery_thread *state);
/// glibc's `__libc_stack_end`: the main thread's stack top as the process started.
uint64_t ctracery_libc_stack_end(void);

#ifdef __cplusplus
}
#endif
#endif
