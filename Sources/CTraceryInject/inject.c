#define _GNU_SOURCE
#include <sys/ptrace.h>
#include <sys/socket.h>

#include "CTraceryInject.h"

int ctracery_ptrace_seize(pid_t tid) { return (int)ptrace(PTRACE_SEIZE, tid, 0, 0); }

int ctracery_ptrace_interrupt(pid_t tid) { return (int)ptrace(PTRACE_INTERRUPT, tid, 0, 0); }

int ctracery_ptrace_getregs(pid_t tid, struct user_regs_struct *registers) {
  return (int)ptrace(PTRACE_GETREGS, tid, 0, registers);
}

int ctracery_ptrace_setregs(pid_t tid, const struct user_regs_struct *registers) {
  return (int)ptrace(PTRACE_SETREGS, tid, 0, registers);
}

int ctracery_ptrace_cont(pid_t tid, int signal) { return (int)ptrace(PTRACE_CONT, tid, 0, (void *)(long)signal); }

int ctracery_ptrace_detach(pid_t tid, int signal) {
  return (int)ptrace(PTRACE_DETACH, tid, 0, (void *)(long)signal);
}

int ctracery_ptrace_event(int status) { return (status >> 16) & 0xff; }

int ctracery_ptrace_event_stop(void) { return PTRACE_EVENT_STOP; }

pid_t ctracery_peer_pid(int fd) {
  struct ucred credentials;
  socklen_t size = sizeof credentials;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &size) != 0) return -1;
  return credentials.pid;
}
