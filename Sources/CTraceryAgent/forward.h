// A function the agent defines hidden in place of another library's, so that the agent does not
// depend on that library (agent.c: the unwinder's, libgcc_s; libm.c: libm's): it forwards to the
// library's own definition, found at the first call by `ctracery_next_symbol` in `home` and kept
// (relaxed: every thread that looks finds the same address). Hidden: the agent's calls only,
// never the program's.
#ifndef TRACERY_FORWARD_H
#define TRACERY_FORWARD_H

#include <stdatomic.h>
#include <stdlib.h>

#include "CTraceryShims.h"

#define TRACERY_FORWARD(home, ret, name, params, args)                                        \
  __attribute__((visibility("hidden"))) ret name params {                                     \
    static ret(*_Atomic next) params;                                                          \
    ret(*forward) params = atomic_load_explicit(&next, memory_order_relaxed);                  \
    if (forward == NULL) {                                                                     \
      forward = (ret(*) params)ctracery_next_symbol(#name, home);                              \
      if (forward == NULL) abort();                                                            \
      atomic_store_explicit(&next, forward, memory_order_relaxed);                             \
    }                                                                                          \
    return forward args;                                                                       \
  }

#endif
