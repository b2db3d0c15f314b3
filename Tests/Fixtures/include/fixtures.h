// C functions with a 5-byte NOP at their entry (no compiler flag needed), for in-process tests.
#ifndef TRACERY_FIXTURES_H
#define TRACERY_FIXTURES_H
#include <stdint.h>

long tracery_fixture_add(long a, long b);
long tracery_fixture_mul3(long a);
long tracery_fixture_mix(long a, long b, long c, long d, long e, long f);
long tracery_fixture_sub(long a, long b);

/// Starts `count` threads that call the fixtures in a loop and check every result.
void tracery_fixture_hammers_start(int count);
/// Stops them; returns the calls made and stores the wrong results seen in `*wrong`.
uint64_t tracery_fixture_hammers_stop(uint64_t *wrong);

#endif
