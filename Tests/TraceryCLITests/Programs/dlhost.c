// Loads PLUGIN with dlopen, calls plugin_work five times, closes it, loads it again and calls it
// once more. Prints the sum: 90 with plugin.c.
#include <dlfcn.h>
#include <stdio.h>

__attribute__((noinline)) long call_plugin(long (*work)(long), long x) { return work(x); }

int main(int argc, char **argv) {
  if (argc < 2) return 2;
  long sum = 0;
  for (int round = 0; round < 2; round++) {
    void *handle = dlopen(argv[1], RTLD_NOW);
    if (handle == NULL) { fprintf(stderr, "%s\n", dlerror()); return 1; }
    long (*work)(long) = (long (*)(long))dlsym(handle, "plugin_work");
    for (long i = 0; i < (round == 0 ? 5 : 1); i++) sum += call_plugin(work, i);
    dlclose(handle);
  }
  printf("%ld\n", sum);
  return 0;
}
