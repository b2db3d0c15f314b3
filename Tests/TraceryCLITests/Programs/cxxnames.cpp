// C++ names that simple demangling could merge: a local class's method inside the function that
// declares it, two instantiations of one template, and an overload pair. Prints "ok 6".
#include <cstdio>

struct Edge {
  int weight;
};

namespace plan {
struct Plan {
  int ComputeCriticalPath(Edge *edge);
};

__attribute__((noinline)) int Plan::ComputeCriticalPath(Edge *edge) {
  struct TopoSort {
    __attribute__((noinline)) static int Visit(Edge *e) { return e->weight + 1; }
  };
  return TopoSort::Visit(edge) + TopoSort::Visit(edge);
}
}  // namespace plan

template <typename T> __attribute__((noinline)) T twice(T value) { return value + value; }
__attribute__((noinline)) int scale(int x) { return x * 2; }
__attribute__((noinline)) double scale(double x) { return x * 2; }

int main() {
  Edge edge{1};
  plan::Plan p;
  int total = p.ComputeCriticalPath(&edge);                         // 4
  total += twice<int>(1) - static_cast<int>(twice<double>(1.0));  // 0
  total += scale(1) - static_cast<int>(scale(1.0));                // 0
  std::printf("ok %d\n", total + 2);
  return 0;
}
