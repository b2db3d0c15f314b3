// The agent's C side: the hooks that start it before `main` and follow dlopen/dlclose, and the
// signal-mask interposers (Swift cannot interpose a libc function with its exact C signature).
#ifndef CTRACERY_AGENT_H
#define CTRACERY_AGENT_H
/// Implemented in Swift (TraceryAgent): reads TRACERY_* from the environment and starts recording.
void tracery_agent_start(void);
/// After a successful dlopen: traces the objects it loaded that record patch sites.
void tracery_agent_loaded(void);
/// Around a dlclose of the object at `path` loaded at `bias`.
void tracery_agent_unloading(const char *path, unsigned long bias);
void tracery_agent_unloaded(const char *path, unsigned long bias);
/// Before the program installs a seccomp filter: the agent makes no system call after it.
void tracery_agent_sandboxing(void);
/// Before a program running as root changes its effective user: spare event files for its
/// later threads.
void tracery_agent_dropping(void);
#include <stdint.h>
/// Before the process leaves without `exit` (`_exit`, `_Exit`, `syscall(SYS_exit_group)`): what
/// the atexit handler does, unless this is a vfork child running in its parent's memory or a
/// signal handler runs.
void tracery_agent_exiting(void);
/// Whether this thread runs a signal handler: the C library's signal trampoline (`sa_restorer`;
/// stored in `restorer` when it is found nowhere, 0 when no signal has a handler) is among the
/// words from here up its stack. A traced handler's return address is in its shadow frame
/// instead (`Tracer.aTracedCallReturns`). Async-signal-safe; makes system calls.
int tracery_agent_in_signal_handler(uint64_t *restorer);
/// `record -p`: while on, the dlopen/dlclose hooks run (preloaded, TRACERY_DIR says so); the
/// functions the program's slots led to; the hooks' code, which those slots are pointed at.
void tracery_agent_following_set(int on);
void tracery_agent_set_next(void *open, void *close);
uint64_t tracery_agent_dlopen_code(void);
uint64_t tracery_agent_dlclose_code(void);
#endif
