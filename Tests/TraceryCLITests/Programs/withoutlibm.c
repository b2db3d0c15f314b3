// Prints whether libm is mapped in this process, after a few traced calls (ScaleTests: the agent
// must not load libm into a program that does not use it).
#include <stdio.h>
#include <string.h>

__attribute__((noinline)) int twice(int x) { return 2 * x; }

int main(void) {
  FILE *maps = fopen("/proc/self/maps", "r");
  if (maps == NULL) return 1;
  char line[4096];
  int mapped = 0;
  while (fgets(line, sizeof line, maps) != NULL) mapped |= strstr(line, "/libm.so") != NULL;
  fclose(maps);
  printf("libm %s %d\n", mapped ? "mapped" : "absent", twice(21));
  return 0;
}
