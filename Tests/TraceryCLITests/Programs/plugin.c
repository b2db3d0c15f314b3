// A plugin loaded with dlopen: built with patch sites, like the program that loads it.
__attribute__((noinline)) long plugin_helper(long x) { return x * 3 + 1; }
__attribute__((noinline)) long plugin_work(long x) { return plugin_helper(x) + plugin_helper(x + 1); }
