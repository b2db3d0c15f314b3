// Built with plain gcc -O2 (no patch-site flag), as programs ship. gcc's -fipa-ra lets `mix` and
// `fmix` keep values in call-clobbered registers (r10, r11, rcx, rsi, r8, r9, xmm1-15) across
// calls of `leaf` and `fleaf`, which it sees do not touch them, and -fipa-stack-alignment lets
// `fmix` (which has no stack frame) call `fleaf` with rsp not 16-byte aligned. A tracer that
// changes any of those registers prints a wrong line; one that calls a handler with rsp as found
// crashes in it.
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) static unsigned leaf(unsigned x) { return x * 2654435761u; }
__attribute__((noinline)) static double fleaf(double x) { return x * 0.5 + 0.25; }

__attribute__((noinline)) unsigned mix(const unsigned *v, int n) {
  unsigned a = v[0], b = v[1], c = v[2], d = v[3], e = v[4], f = v[5], g = v[6], h = v[7];
  unsigned i = v[8], j = v[9], k = v[10], l = v[11], m = v[12];
  for (int r = 0; r < n; r++) {
    a += leaf(b ^ r); b += leaf(c + a); c ^= leaf(d + b); d += leaf(e ^ c);
    e += leaf(f + d); f ^= leaf(g + e); g += leaf(h ^ f); h += leaf(i + g);
    i ^= leaf(j + h); j += leaf(k ^ i); k += leaf(l + j); l ^= leaf(m + k); m += leaf(a ^ l);
  }
  return a ^ b ^ c ^ d ^ e ^ f ^ g ^ h ^ i ^ j ^ k ^ l ^ m;
}

__attribute__((noinline)) double fmix(const double *v, int n) {
  double a = v[0], b = v[1], c = v[2], d = v[3], e = v[4], f = v[5], g = v[6], h = v[7];
  double i = v[8], j = v[9], k = v[10], l = v[11], m = v[12], o = v[13];
  for (int r = 0; r < n; r++) {
    a -= fleaf(b); b -= fleaf(c); c -= fleaf(d); d -= fleaf(e); e -= fleaf(f); f -= fleaf(g);
    g -= fleaf(h); h -= fleaf(i); i -= fleaf(j); j -= fleaf(k); k -= fleaf(l); l -= fleaf(m);
    m -= fleaf(o); o -= fleaf(a);
  }
  return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h + 9 * i + 10 * j + 11 * k + 12 * l
    + 13 * m + 14 * o;
}

int main(int argc, char **argv) {
  unsigned v[13];
  double w[14];
  for (int i = 0; i < 13; i++) v[i] = i * 7 + 1;
  for (int i = 0; i < 14; i++) w[i] = i * 0.25 + 1;
  // Rounds from argv[1]: many calls of fleaf from fmix also fill the recorder's buffers there.
  int rounds = argc > 1 ? atoi(argv[1]) : 1;
  double total = 0;
  for (int r = 0; r < rounds; r++) {
    w[0] = 1 + (r & 1) * 0.5;
    total += fmix(w, 20);
  }
  printf("%u %.6g\n", mix(v, 100), total / rounds);
  return 0;
}
