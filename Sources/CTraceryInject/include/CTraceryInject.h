#ifndef CTRACERY_INJECT_H
#define CTRACERY_INJECT_H

// ptrace for `tracery record -p` (glibc's ptrace is variadic: Swift cannot call it). The
// protocol (seize, interrupt, remote calls, detach) is Swift's, in the tracery command.

#include <stdint.h>
#include <sys/types.h>
#include <sys/user.h>

#ifdef __cplusplus
extern "C" {
#endif

/// PTRACE_SEIZE with no options (the thread is not stopped). 0, or -1 with errno.
int ctracery_ptrace_seize(pid_t tid);
/// PTRACE_INTERRUPT: a seized thread stops (a PTRACE_EVENT_STOP) without a signal the program
/// could see. 0, or -1 with errno.
int ctracery_ptrace_interrupt(pid_t tid);
/// PTRACE_GETREGS / PTRACE_SETREGS. 0, or -1 with errno.
int ctracery_ptrace_getregs(pid_t tid, struct user_regs_struct *registers);
int ctracery_ptrace_setregs(pid_t tid, const struct user_regs_struct *registers);
/// PTRACE_CONT delivering `signal` (0: none). 0, or -1 with errno.
int ctracery_ptrace_cont(pid_t tid, int signal);
/// PTRACE_DETACH delivering `signal` (0: none). 0, or -1 with errno.
int ctracery_ptrace_detach(pid_t tid, int signal);
/// The event number of a ptrace stop's status (status >> 16), and PTRACE_EVENT_STOP.
int ctracery_ptrace_event(int status);
int ctracery_ptrace_event_stop(void);
/// The pid of the process at the other end of the Unix socket `fd` (SO_PEERCRED: struct ucred
/// needs _GNU_SOURCE, which Swift's Glibc does not define), or -1.
pid_t ctracery_peer_pid(int fd);

#ifdef __cplusplus
}
#endif
#endif
