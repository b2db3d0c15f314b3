// Calls into libc through the PLT (strlen from a traced function, malloc, snprintf, puts, free).
// Built as programs ship (-O2). Prints 14.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *words[] = {"alpha", "beta", "gamma"};

__attribute__((noinline)) long measure(const char *text) { return (long)strlen(text); }

int main(int argc, char **argv) {
  (void)argv;
  long total = 0;
  for (int i = 0; i < 3; i++) total += measure(words[(i + argc - 1) % 3]);
  char *text = malloc(64);
  snprintf(text, 64, "%ld", total);
  puts(text);
  free(text);
  return 0;
}
