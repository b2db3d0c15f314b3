#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>

#include "CTraceryAgent.h"

typedef int (*tracery_main)(int, char **, char **);
typedef int (*tracery_start_main)(tracery_main, int, char **, void (*)(void), void (*)(void), void (*)(void),
                                  void *);

// The program's entry code hands control to libc here (this library is preloaded, so its
// definition comes first): every shared object's initializers have run, the program's own
// constructors and main have not. The agent starts now, not from a constructor of this library:
// it carries its own copy of the Swift runtime (linked with -static-stdlib: loading libswiftCore
// cost each process 2.2 ms), whose initializers run after a constructor of ours (link order) —
// Swift code run before them saw, e.g., the hashing seed change under its dictionaries.
int __libc_start_main(tracery_main main, int argc, char **argv, void (*init)(void), void (*fini)(void),
                      void (*rtld_fini)(void), void *stack_end) {
  tracery_start_main next = (tracery_start_main)dlsym(RTLD_NEXT, "__libc_start_main");
  if (next == NULL) abort();
  tracery_agent_start();
  return next(main, argc, argv, init, fini, rtld_fini, stack_end);
}
