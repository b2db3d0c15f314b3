// A running program that loads a plugin when told (`record -p` while objects are loaded): prints
// "ready", then for each line on stdin: "load PATH" dlopens PATH and calls its plugin_work 1,000
// times through call_plugin, printing "called SUM"; "close" dlcloses it. Ends when stdin closes.
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

__attribute__((noinline)) long call_plugin(long (*work)(long), long x) { return work(x); }

int main(void) {
  char line[4096];
  void *handle = NULL;
  printf("ready\n");
  fflush(stdout);
  while (fgets(line, sizeof line, stdin) != NULL) {
    line[strcspn(line, "\n")] = 0;
    if (strncmp(line, "load ", 5) == 0) {
      handle = dlopen(line + 5, RTLD_NOW);
      if (handle == NULL) {
        printf("%s\n", dlerror());
      } else {
        long (*work)(long) = (long (*)(long))dlsym(handle, "plugin_work");
        long sum = 0;
        for (long i = 0; i < 1000; i++) sum += call_plugin(work, i);
        printf("called %ld\n", sum);
      }
    } else if (strcmp(line, "close") == 0 && handle != NULL) {
      dlclose(handle);
      handle = NULL;
      printf("closed\n");
    }
    fflush(stdout);
  }
  return 0;
}
