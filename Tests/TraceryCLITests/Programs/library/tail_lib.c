// A patchable shared library (built -O2 -fPIC): lib_entry tail-calls lib_leaf.
__attribute__((noinline)) int lib_leaf(int x) { return x * 3; }
__attribute__((noinline)) int lib_entry(int x) { return lib_leaf(x + 1); }
