// A C++ function that throws, traced in tests: exceptions must unwind through its trampoline.
#ifndef TRACERY_CXX_FIXTURES_H
#define TRACERY_CXX_FIXTURES_H
#ifdef __cplusplus
extern "C" {
#endif
/// Address of the traced thrower.
void *tracery_cxx_thrower_address(void);
/// Calls the thrower with `value` inside try/catch; returns the caught value, or -1 if nothing
/// was thrown (value 0 returns normally: the result is then the return value + 1000).
long tracery_cxx_catch(long value);
/// Three patchable levels, the last throwing `value` when non-zero: level1 → level2 → level3.
long tracery_cxx_level1(long value);
long tracery_cxx_level2(long value);
long tracery_cxx_level3(long value);
/// Calls level1 inside try/catch: the caught value, or level1's result + 1000.
long tracery_cxx_catch_levels(long value);
/// Patchable itself: calls level1 inside try/catch, returns the caught value (or level1's + 1000).
long tracery_cxx_traced_catcher(long value);
/// Catches in the traced catcher, rethrows, and catches again here.
long tracery_cxx_rethrow(long value);
#ifdef __cplusplus
}
#endif
#endif
