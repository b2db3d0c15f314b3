// Throws a C++ exception through three traced frames and catches it; then keeps calling traced
// functions. Prints "caught 42 then 7" when all went as untraced.
#include <cstdio>
#include <stdexcept>

__attribute__((noinline)) int deepest(int value) {
  if (value > 0) throw std::runtime_error("42");
  return value;
}
__attribute__((noinline)) int middle(int value) { return deepest(value) + 1; }
__attribute__((noinline)) int outer(int value) { return middle(value) + 1; }
__attribute__((noinline)) int after(int value) { return value + 5; }

int main() {
  int caught = 0;
  try {
    outer(1);
  } catch (const std::exception &error) {
    std::sscanf(error.what(), "%d", &caught);
  }
  std::printf("caught %d then %d\n", caught, after(outer(0)));
  return 0;
}
