// A C++ plugin for dlhost.c, a C program: opened with RTLD_LOCAL, so its C++ runtime and its
// unwinder (libstdc++, libgcc_s) stay out of the global scope where the agent's interposers look
// for what they forward to. Every call throws through a traced frame and catches; plugin_work
// returns what plugin.c's does (dlhost prints 90).
#include <stdexcept>

__attribute__((noinline)) static long plugin_helper(long x) {
  if (x >= 0) throw std::runtime_error("thrown");
  return 0;
}

extern "C" long plugin_work(long x) {
  try {
    return plugin_helper(x);
  } catch (const std::exception &) {
    return (3 * x + 1) + (3 * (x + 1) + 1);
  }
}
