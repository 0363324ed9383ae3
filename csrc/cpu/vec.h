// The CPU vectorization machinery of fastres' kernels: each parallel chunk compiled for the best
// ISA this CPU has, loops marked free of aliasing, and reductions in independent lanes.
#pragma once

#include <cstdint>

namespace fastres {

// The loops are compiled twice: for the baseline ISA of the build (SSE2 on x86-64: setup.py
// passes no -march) and, on x86-64 CPUs that have them (checked once), with AVX2 + FMA, which
// halves their instruction count; ATen's own CPU kernels dispatch on the CPU the same way.
// Each parallel chunk's body is a lambda marked FASTRES_INLINE, inlined into a caller compiled
// for the chosen ISA. Results agree to rounding: the AVX2 build may contract a multiply-add
// into an FMA.
#if defined(__GNUC__)
#define FASTRES_INLINE __attribute__((always_inline))
#else
#define FASTRES_INLINE
#endif
#if defined(__x86_64__) && defined(__GNUC__)
template <typename F>
__attribute__((target("avx2,fma"))) void run_avx2(const F& f) {
  f();
}
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#else
template <typename F>
void run_avx2(const F& f) {
  f();
}
inline bool cpu_has_avx2() { return false; }
#endif

template <typename F>
void run_baseline(const F& f) {
  f();
}

// Runs f (a FASTRES_INLINE lambda) compiled for the best ISA this CPU has.
template <typename F>
inline void with_best_isa(const F& f) {
  if (cpu_has_avx2()) {
    run_avx2(f);
  } else {
    run_baseline(f);
  }
}

// On a loop: its iterations carry no memory dependence (the outputs alias no input). GCC
// otherwise versions these loops with run-time overlap checks of every pointer pair, which
// fail on adjacent buffers and leave the scalar loop running (how much slower:
// bench/results/README.md, "Measurements behind comments").
#if defined(__clang__)
#define FASTRES_NO_ALIAS _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define FASTRES_NO_ALIAS _Pragma("GCC ivdep")
#else
#define FASTRES_NO_ALIAS
#endif

// Sums f(i) over [0, n) in kLanes independent accumulators: a reduction into one scalar is a
// loop-carried dependency that the compiler may not reorder (no -ffast-math), so it would stay
// scalar; kLanes lanes of a fixed-size inner loop vectorize.
constexpr int kLanes = 16;

template <typename acc_t, int K, typename F>
FASTRES_INLINE inline void lane_sums(int64_t n, F f, acc_t (&out)[K]) {
  acc_t lanes[K][kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) f(i + j, lanes, j);
  }
  for (; i < n; ++i) f(i, lanes, 0);
  for (int k = 0; k < K; ++k) {
    acc_t total = 0;
    for (int j = 0; j < kLanes; ++j) total += lanes[k][j];
    out[k] = total;
  }
}

}  // namespace fastres
