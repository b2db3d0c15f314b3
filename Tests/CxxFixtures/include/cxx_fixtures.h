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
#ifdef __cplusplus
}
#endif
#endif
