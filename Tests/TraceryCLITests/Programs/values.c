// Arguments and return values for `tracery record -A / -R` (built by RecordCommandTests).
#include <stdio.h>
#include <string.h>

__attribute__((noinline)) long add(long a, long b) { return a + b; }

__attribute__((noinline)) int greet(const char *name, int times) {
  return name == 0 || (unsigned long)name < 4096 ? -1 : (int)strlen(name) * times;
}

__attribute__((noinline)) char initial(const char *name) { return name[0]; }

__attribute__((noinline)) long fib(long n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

__attribute__((noinline)) double scale(double x, long n, float y) { return x * (double)n + (double)y; }

int main(void) {
  long sum = add(40, -2);
  int greeting = greet("world \"quoted\"", 3);
  int bad = greet((const char *)16, 1);
  char long_name[100];
  memset(long_name, 'a', sizeof long_name - 1);
  long_name[sizeof long_name - 1] = 0;
  int long_greeting = greet(long_name, 1);
  printf("%ld %d %d %d %c %ld %.2f\n", sum, greeting, bad, long_greeting, initial("world"), fib(3),
         scale(1.5, 3, 0.25f));
  return 0;
}
