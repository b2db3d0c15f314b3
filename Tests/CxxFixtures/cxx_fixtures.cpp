#include "cxx_fixtures.h"

#include <stdexcept>

struct traced_error {
  long value;
};

extern "C" __attribute__((patchable_function_entry(5, 0), noinline)) long tracery_cxx_thrower(long value) {
  if (value != 0) throw traced_error{value};
  return 7;
}

void *tracery_cxx_thrower_address(void) { return reinterpret_cast<void *>(&tracery_cxx_thrower); }

long tracery_cxx_catch(long value) {
  long (*volatile thrower)(long) = tracery_cxx_thrower;
  try {
    return thrower(value) + 1000;
  } catch (const traced_error &error) {
    return error.value;
  }
}

#define TRACED extern "C" __attribute__((patchable_function_entry(5, 0), noinline))

TRACED long tracery_cxx_level3(long value) {
  if (value != 0) throw traced_error{value};
  return 3;
}
TRACED long tracery_cxx_level2(long value) { return tracery_cxx_level3(value) + 20; }
TRACED long tracery_cxx_level1(long value) { return tracery_cxx_level2(value) + 100; }

long tracery_cxx_catch_levels(long value) {
  try {
    return tracery_cxx_level1(value) + 1000;
  } catch (const traced_error &error) {
    return error.value;
  }
}

TRACED long tracery_cxx_traced_catcher(long value) {
  try {
    return tracery_cxx_level1(value) + 1000;
  } catch (const traced_error &error) {
    return error.value;
  }
}

TRACED long tracery_cxx_rethrower(long value) {
  try {
    return tracery_cxx_level1(value);
  } catch (const traced_error &) {
    throw;
  }
}

long tracery_cxx_rethrow(long value) {
  try {
    return tracery_cxx_rethrower(value);
  } catch (const traced_error &error) {
    return error.value + 1;
  }
}
