// The C++ example: recursion through a class template, two std::threads, and a fork. Build it
// with patch sites and record it:
//   clang++ -O0 -fpatchable-function-entry=5 -pthread Examples/cxxdemo/cxxdemo.cpp -o cxxdemo
//   swift run tracery live -- ./cxxdemo
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

namespace shapes {
template <typename T>
struct Tree {
  T value;
  std::vector<Tree> children;

  __attribute__((noinline)) T sum() const {
    T total = value;
    for (const Tree &child : children) total += child.sum();
    return total;
  }
};

__attribute__((noinline)) Tree<long> build(int depth) {
  Tree<long> tree{depth, {}};
  if (depth > 0)
    for (int i = 0; i < 2; i++) tree.children.push_back(build(depth - 1));
  return tree;
}
}  // namespace shapes

__attribute__((noinline)) static long work(int depth) { return shapes::build(depth).sum(); }

int main() {
  long results[2] = {0, 0};
  std::thread first([&] { results[0] = work(2); });
  std::thread second([&] { results[1] = work(1); });
  first.join();
  second.join();
  std::fflush(stdout);
  pid_t pid = fork();
  if (pid == 0) std::exit(static_cast<int>(work(1) % 256));
  int status = 0;
  waitpid(pid, &status, 0);
  std::printf("threads %ld %ld child %d\n", results[0], results[1], WEXITSTATUS(status));
  return 0;
}
