// Runs a command and prints its peak resident memory in KiB on stderr ("peak-kib N"), then exits
// with its status. A small program forks it: wait4's ru_maxrss counts the memory of the process
// that forked (or vforked) the command as the command's own, so a large test runner or
// benchmark must not start the command itself.
#include <stdio.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  pid_t pid = fork();
  if (pid == 0) {
    execvp(argv[1], argv + 1);
    _exit(127);
  }
  int status = 0;
  struct rusage usage;
  if (wait4(pid, &status, 0, &usage) < 0) return 2;
  fprintf(stderr, "peak-kib %ld\n", usage.ru_maxrss);
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
