// Runs a program with no signal blocked, as a shell would start it (a test runner's threads block
// real-time signals, and a child inherits its parent's mask): unblocked PROGRAM ARGS...
#include <signal.h>
#include <unistd.h>

int main(int argc, char **argv) {
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  if (argc < 2) return 2;
  execv(argv[1], argv + 1);
  return 127;
}
