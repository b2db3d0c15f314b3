// The agent without libm (issue 14, a traced process's start). The Swift standard library the
// agent carries names 107 libm functions (its Float, Double and Float80 math), which made
// libm.so.6 a dependency: mapped, relocated (its ifunc resolvers run) and its pages faulted in
// every traced process, and its 107 names looked up at start (`tracery record` sets
// LD_BIND_NOW): the idle agent's load 1.36 -> 1.10 ms a child without it (session 26). The
// agent's own code calls only the rounding ones (Dictionary and Set sizes). Defined here,
// hidden, they keep libm out (`link/libm.so` names it AS_NEEDED, so the linker drops it): the
// rounding ones computed (CTraceryShims.h), the others forwarding to libm's own, found at their
// first call by `ctracery_next_symbol` (the program's libm, else libm loaded then). Hidden, they
// never stand in for the program's libm.
// A new libm name in a later standard library links libm again: ScaleTests'
// `theAgentCarriesOnlyWhatItsStartNeeds` fails then; add it here.

#include <stdatomic.h>
#include <stdlib.h>

#include "CTraceryShims.h"

#define TRACERY_LIBM_ROUNDING(name, type, rounding) \
  __attribute__((visibility("hidden"))) type name(type x) { return ctracery_round_##type(x, rounding); }
TRACERY_LIBM_ROUNDING(ceil, double, CTRACERY_ROUND_UP)
TRACERY_LIBM_ROUNDING(floor, double, CTRACERY_ROUND_DOWN)
TRACERY_LIBM_ROUNDING(trunc, double, CTRACERY_ROUND_TOWARD_ZERO)
TRACERY_LIBM_ROUNDING(round, double, CTRACERY_ROUND_NEAREST)
TRACERY_LIBM_ROUNDING(ceilf, float, CTRACERY_ROUND_UP)
TRACERY_LIBM_ROUNDING(floorf, float, CTRACERY_ROUND_DOWN)
TRACERY_LIBM_ROUNDING(truncf, float, CTRACERY_ROUND_TOWARD_ZERO)
TRACERY_LIBM_ROUNDING(roundf, float, CTRACERY_ROUND_NEAREST)

// (Relaxed: every thread that looks finds the same address.)
#define TRACERY_LIBM_FORWARD(ret, name, params, args)                                          \
  __attribute__((visibility("hidden"))) ret name params {                                     \
    static ret(*_Atomic next) params;                                                          \
    ret(*forward) params = atomic_load_explicit(&next, memory_order_relaxed);                  \
    if (forward == NULL) {                                                                     \
      forward = (ret(*) params)ctracery_next_symbol(#name, CTRACERY_IN_LIBM);                  \
      if (forward == NULL) abort();                                                            \
      atomic_store_explicit(&next, forward, memory_order_relaxed);                             \
    }                                                                                          \
    return forward args;                                                                       \
  }
#define TRACERY_LIBM_1(type, name) TRACERY_LIBM_FORWARD(type, name, (type x), (x))
#define TRACERY_LIBM_2(type, name) TRACERY_LIBM_FORWARD(type, name, (type x, type y), (x, y))
#define TRACERY_LIBM_3(type, name) TRACERY_LIBM_FORWARD(type, name, (type x, type y, type z), (x, y, z))

TRACERY_LIBM_1(double, cos)
TRACERY_LIBM_1(double, exp)
TRACERY_LIBM_1(double, exp2)
TRACERY_LIBM_1(double, log)
TRACERY_LIBM_1(double, log10)
TRACERY_LIBM_1(double, log2)
TRACERY_LIBM_1(double, nearbyint)
TRACERY_LIBM_1(double, rint)
TRACERY_LIBM_1(double, sin)
TRACERY_LIBM_1(double, sqrt)
TRACERY_LIBM_2(double, fmod)
TRACERY_LIBM_2(double, remainder)
TRACERY_LIBM_3(double, fma)
TRACERY_LIBM_FORWARD(double, jn, (int n, double x), (n, x))
TRACERY_LIBM_FORWARD(double, yn, (int n, double x), (n, x))
TRACERY_LIBM_FORWARD(double, lgamma_r, (double x, int *sign), (x, sign))
TRACERY_LIBM_FORWARD(double, remquo, (double x, double y, int *quotient), (x, y, quotient))

TRACERY_LIBM_1(float, acosf)
TRACERY_LIBM_1(float, acoshf)
TRACERY_LIBM_1(float, asinf)
TRACERY_LIBM_1(float, asinhf)
TRACERY_LIBM_1(float, atanf)
TRACERY_LIBM_1(float, atanhf)
TRACERY_LIBM_1(float, cbrtf)
TRACERY_LIBM_1(float, cosf)
TRACERY_LIBM_1(float, coshf)
TRACERY_LIBM_1(float, erfcf)
TRACERY_LIBM_1(float, erff)
TRACERY_LIBM_1(float, exp2f)
TRACERY_LIBM_1(float, expf)
TRACERY_LIBM_1(float, expm1f)
TRACERY_LIBM_1(float, log10f)
TRACERY_LIBM_1(float, log1pf)
TRACERY_LIBM_1(float, log2f)
TRACERY_LIBM_1(float, logbf)
TRACERY_LIBM_1(float, logf)
TRACERY_LIBM_1(float, nearbyintf)
TRACERY_LIBM_1(float, rintf)
TRACERY_LIBM_1(float, sinf)
TRACERY_LIBM_1(float, sinhf)
TRACERY_LIBM_1(float, sqrtf)
TRACERY_LIBM_1(float, tanf)
TRACERY_LIBM_1(float, tanhf)
TRACERY_LIBM_1(float, tgammaf)
TRACERY_LIBM_2(float, atan2f)
TRACERY_LIBM_2(float, fdimf)
TRACERY_LIBM_2(float, fmodf)
TRACERY_LIBM_2(float, hypotf)
TRACERY_LIBM_2(float, nextafterf)
TRACERY_LIBM_2(float, powf)
TRACERY_LIBM_2(float, remainderf)
TRACERY_LIBM_3(float, fmaf)
TRACERY_LIBM_FORWARD(float, lgammaf_r, (float x, int *sign), (x, sign))
TRACERY_LIBM_FORWARD(float, remquof, (float x, float y, int *quotient), (x, y, quotient))
TRACERY_LIBM_FORWARD(float, nanf, (const char *payload), (payload))

TRACERY_LIBM_1(long double, acoshl)
TRACERY_LIBM_1(long double, acosl)
TRACERY_LIBM_1(long double, asinhl)
TRACERY_LIBM_1(long double, asinl)
TRACERY_LIBM_1(long double, atanhl)
TRACERY_LIBM_1(long double, atanl)
TRACERY_LIBM_1(long double, cbrtl)
TRACERY_LIBM_1(long double, ceill)
TRACERY_LIBM_1(long double, coshl)
TRACERY_LIBM_1(long double, cosl)
TRACERY_LIBM_1(long double, erfcl)
TRACERY_LIBM_1(long double, erfl)
TRACERY_LIBM_1(long double, exp2l)
TRACERY_LIBM_1(long double, expl)
TRACERY_LIBM_1(long double, expm1l)
TRACERY_LIBM_1(long double, floorl)
TRACERY_LIBM_1(long double, log10l)
TRACERY_LIBM_1(long double, log1pl)
TRACERY_LIBM_1(long double, log2l)
TRACERY_LIBM_1(long double, logbl)
TRACERY_LIBM_1(long double, logl)
TRACERY_LIBM_1(long double, nearbyintl)
TRACERY_LIBM_1(long double, rintl)
TRACERY_LIBM_1(long double, roundl)
TRACERY_LIBM_1(long double, sinhl)
TRACERY_LIBM_1(long double, sinl)
TRACERY_LIBM_1(long double, sqrtl)
TRACERY_LIBM_1(long double, tanhl)
TRACERY_LIBM_1(long double, tanl)
TRACERY_LIBM_1(long double, tgammal)
TRACERY_LIBM_1(long double, truncl)
TRACERY_LIBM_2(long double, atan2l)
TRACERY_LIBM_2(long double, fdiml)
TRACERY_LIBM_2(long double, fmaxl)
TRACERY_LIBM_2(long double, fminl)
TRACERY_LIBM_2(long double, fmodl)
TRACERY_LIBM_2(long double, hypotl)
TRACERY_LIBM_2(long double, nextafterl)
TRACERY_LIBM_2(long double, powl)
TRACERY_LIBM_2(long double, remainderl)
TRACERY_LIBM_3(long double, fmal)
TRACERY_LIBM_FORWARD(long double, lgammal_r, (long double x, int *sign), (x, sign))
TRACERY_LIBM_FORWARD(long double, remquol, (long double x, long double y, int *quotient), (x, y, quotient))
TRACERY_LIBM_FORWARD(long double, nanl, (const char *payload), (payload))
