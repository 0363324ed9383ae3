// CPU kernels of the fastres:: BatchNorm family (schemas and semantics: csrc/fastres.cpp).
//
// Layouts: x is viewed as [N, C, S] (S = H * W). NCHW walks planes of S contiguous values of one
// channel; channels_last walks rows of C contiguous channels. Inner loops run over contiguous
// memory and are written for the compiler to vectorize (restrict pointers, and the machinery of
// vec.h: the best ISA per chunk, loops marked free of aliasing, reductions in lanes); outer
// loops are split over threads with at::parallel_for. Accumulation in at::opmath_type
// (batchnorm_common.h); partial results of chunks are merged in fp64. Argument checks, layout
// and output allocation: the prepare_* functions of batchnorm_common.h, shared with CUDA.
// Statistics: each chunk computes its mean and M2 with two passes over cache-resident data;
// chunks merge with Chan's parallel formula (as stable as Welford, and vectorizable).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "../batchnorm_common.h"
#include "vec.h"

namespace fastres {
namespace {

using at::Tensor;

// About 64 KiB of input per chunk of element-wise work and of backward partial sums.
constexpr int64_t kChunkElems = 16384;
// The statistics' chunks (256 KiB of fp32): their second pass still hits L2, and there are
// few enough of them that the per-channel fp64 merge stays cheap.
constexpr int64_t kStatsChunkElems = 65536;

// The element-wise tail shared by apply and backward: z = x * scale + shift + residual term.
template <typename acc_t>
struct Tail {
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* scale_r;  // nullptr: the residual is added as is
  const acc_t* shift_r;
};

// Runs element-wise work over parallel chunks in either layout: row_fn(base) for each
// channels_last row (channels 0..C-1 at elements [base, base + C)), plane_fn(base, c) for each
// NCHW plane (channel c at elements [base, base + S)).
template <typename RowFn, typename PlaneFn>
void for_each_block(const Geometry& g, RowFn row_fn, PlaneFn plane_fn) {
  if (g.channels_last) {
    const int64_t rows = g.n * g.s;
    const int64_t grain = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, g.c));
    at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
      with_best_isa([&]() FASTRES_INLINE {
        for (int64_t r = r0; r < r1; ++r) row_fn(r * g.c);
      });
    });
  } else {
    const int64_t planes = g.n * g.c;
    const int64_t grain = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(1, g.s));
    at::parallel_for(0, planes, grain, [&](int64_t p0, int64_t p1) {
      with_best_isa([&]() FASTRES_INLINE {
        for (int64_t p = p0; p < p1; ++p) plane_fn(p * g.s, p % g.c);
      });
    });
  }
}

// Dispatches the three tail switches to compile-time constants.
template <typename F>
void dispatch_tail(bool has_r, bool has_sr, bool relu, F f) {
  auto with_relu = [&](auto r_tag, auto sr_tag) {
    if (relu) {
      f(r_tag, sr_tag, std::true_type{});
    } else {
      f(r_tag, sr_tag, std::false_type{});
    }
  };
  if (!has_r) {
    with_relu(std::false_type{}, std::false_type{});
  } else if (has_sr) {
    with_relu(std::true_type{}, std::true_type{});
  } else {
    with_relu(std::true_type{}, std::false_type{});
  }
}

// The element-wise tail of every op (apply, backward reduce, backward elemt):
// z = x * scale + shift [+ r | + r * scale_r + shift_r] for channel c. The per-channel vectors
// are restrict parameters (callers pass Tail's pointers as they are): otherwise the compiler
// must assume that the outputs alias them, and does not vectorize. The loops that write the
// outputs also carry FASTRES_NO_ALIAS (vec.h).
template <typename acc_t, bool HR, bool HS>
FASTRES_INLINE inline acc_t tail_at(acc_t xv, acc_t rv, const acc_t* __restrict ts,
                                    const acc_t* __restrict tt, const acc_t* __restrict tsr,
                                    const acc_t* __restrict ttr, int64_t c) {
  acc_t z = xv * ts[c] + tt[c];
  if constexpr (HR) z += HS ? rv * tsr[c] + ttr[c] : rv;
  return z;
}

// ReLU's gradient as PyTorch's threshold_backward: 0 where z <= 0, g elsewhere, NaN z included
// (the NaN itself propagates through the other terms, as in PyTorch).
template <typename acc_t>
FASTRES_INLINE inline acc_t relu_grad(acc_t z, acc_t g) {
  return z <= acc_t(0) ? acc_t(0) : g;
}

// One channels_last row of bn_backward_reduce: s0[c] += g, s1[c] += g (x - m), s2[c] += g (r - mr).
template <typename scalar_t, typename acc_t, bool HR, bool HS, bool RL>
FASTRES_INLINE inline void reduce_row(const scalar_t* __restrict go, const scalar_t* __restrict x,
                                      const scalar_t* __restrict r, const Tail<acc_t>& t,
                                      const acc_t* __restrict m, const acc_t* __restrict mr,
                                      acc_t* __restrict s0, acc_t* __restrict s1,
                                      acc_t* __restrict s2, int64_t C) {
  const acc_t *__restrict ts = t.scale, *__restrict tt = t.shift;
  const acc_t *__restrict tsr = t.scale_r, *__restrict ttr = t.shift_r;
FASTRES_NO_ALIAS
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xv = static_cast<acc_t>(x[c]);
    const acc_t rv = HR ? static_cast<acc_t>(r[c]) : acc_t(0);
    acc_t gv = static_cast<acc_t>(go[c]);
    if constexpr (RL) gv = relu_grad(tail_at<acc_t, HR, HS>(xv, rv, ts, tt, tsr, ttr, c), gv);
    s0[c] += gv;
    s1[c] += gv * (xv - m[c]);
    if constexpr (HS) s2[c] += gv * (rv - mr[c]);
  }
}

// One NCHW plane (channel c) of bn_backward_reduce.
template <typename scalar_t, typename acc_t, bool HR, bool HS, bool RL>
FASTRES_INLINE inline void reduce_plane(const scalar_t* __restrict go,
                                        const scalar_t* __restrict x,
                                        const scalar_t* __restrict r, const Tail<acc_t>& t,
                                        int64_t c, acc_t m, acc_t mr, int64_t n,
                                        acc_t (&out)[3]) {
  lane_sums<acc_t, 3>(n, [&](int64_t i, auto& l, int j) FASTRES_INLINE {
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t rv = HR ? static_cast<acc_t>(r[i]) : acc_t(0);
    acc_t gv = static_cast<acc_t>(go[i]);
    if constexpr (RL) {
      gv = relu_grad(tail_at<acc_t, HR, HS>(xv, rv, t.scale, t.shift, t.scale_r, t.shift_r, c),
                     gv);
    }
    l[0][j] += gv;
    l[1][j] += gv * (xv - m);
    if constexpr (HS) l[2][j] += gv * (rv - mr);
  }, out);
}

// bn_backward_elemt over n contiguous elements: a channels_last row (ROW, channels 0..n-1) or
// an NCHW plane of channel c. TX / TR: the x / r norm trains (batch statistics), so its gradient
// has the terms in x / r; without them x and r are not read into it, so that a NaN there does
// not leak into a gradient that PyTorch computes from g alone.
template <typename scalar_t, typename acc_t, bool HR, bool HS, bool RL, bool WR, bool ROW,
          bool TX, bool TR>
FASTRES_INLINE inline void elemt_span(const scalar_t* __restrict go, const scalar_t* __restrict x,
                                      const scalar_t* __restrict r, const Tail<acc_t>& t,
                                      const acc_t* __restrict A, const acc_t* __restrict B,
                                      const acc_t* __restrict K, const acc_t* __restrict AR,
                                      const acc_t* __restrict BR, const acc_t* __restrict KR,
                                      int64_t c0, scalar_t* __restrict gx,
                                      scalar_t* __restrict gr, int64_t n) {
  const acc_t *__restrict ts = t.scale, *__restrict tt = t.shift;
  const acc_t *__restrict tsr = t.scale_r, *__restrict ttr = t.shift_r;
FASTRES_NO_ALIAS
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = ROW ? i : c0;
    const acc_t xv = static_cast<acc_t>(x[i]);
    const acc_t rv = HR ? static_cast<acc_t>(r[i]) : acc_t(0);
    acc_t gv = static_cast<acc_t>(go[i]);
    if constexpr (RL) gv = relu_grad(tail_at<acc_t, HR, HS>(xv, rv, ts, tt, tsr, ttr, c), gv);
    gx[i] = static_cast<scalar_t>(TX ? A[c] * gv + B[c] * xv + K[c] : A[c] * gv);
    if constexpr (WR && HR) {
      gr[i] = static_cast<scalar_t>(TR ? AR[c] * gv + BR[c] * rv + KR[c] : AR[c] * gv);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// bn_stats

template <typename scalar_t, typename acc_t>
void stats_kernel(const scalar_t* x, const Geometry& g, acc_t* mean_out, acc_t* m2_out) {
  const int64_t C = g.c;
  if (g.n * g.s == 0) {
    std::fill(mean_out, mean_out + C, acc_t(0));
    std::fill(m2_out, m2_out + C, acc_t(0));
    return;
  }
  // Per part: count, mean[C], m2[C] in fp64; merged per channel afterwards. Channels_last: one
  // part per thread, into which the thread merges each of its chunks as it finishes it (a
  // part per chunk would leave a long serial merge); NCHW: one part per sample.
  std::vector<int64_t> counts;
  std::vector<double> means, m2s;
  int64_t chunks;
  if (g.channels_last) {
    const int64_t rows = g.n * g.s;
    const int64_t chunk_rows = std::max<int64_t>(1, kStatsChunkElems / C);
    chunks = at::get_num_threads();
    counts.assign(chunks, 0);
    means.assign(chunks * C, 0.0);
    m2s.assign(chunks * C, 0.0);
    at::parallel_for(0, (rows + chunk_rows - 1) / chunk_rows, 1, [&](int64_t k0, int64_t k1) {
      const int64_t t = at::get_thread_num();
      TORCH_INTERNAL_ASSERT(t < chunks);
      std::vector<acc_t> buf(2 * C);
      with_best_isa([&]() FASTRES_INLINE {
        acc_t* __restrict m = buf.data();
        acc_t* __restrict q = buf.data() + C;
        double* __restrict pm = means.data() + t * C;
        double* __restrict pq = m2s.data() + t * C;
        int64_t n = counts[t];
        for (int64_t k = k0; k < k1; ++k) {
          const int64_t r0 = k * chunk_rows, r1 = std::min(rows, r0 + chunk_rows);
          std::fill(buf.begin(), buf.end(), acc_t(0));
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* __restrict row = x + r * C;
            for (int64_t c = 0; c < C; ++c) m[c] += static_cast<acc_t>(row[c]);
          }
          const acc_t inv = acc_t(1) / static_cast<acc_t>(r1 - r0);
          for (int64_t c = 0; c < C; ++c) m[c] *= inv;
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* __restrict row = x + r * C;
            for (int64_t c = 0; c < C; ++c) {
              const acc_t d = static_cast<acc_t>(row[c]) - m[c];
              q[c] += d * d;
            }
          }
          // Chan's merge of the chunk into the thread's part.
          const int64_t nb = r1 - r0, total = n + nb;
          const double wb = static_cast<double>(nb) / static_cast<double>(total);
          const double cross = static_cast<double>(n) * wb;
          for (int64_t c = 0; c < C; ++c) {
            const double delta = static_cast<double>(m[c]) - pm[c];
            pm[c] += delta * wb;
            pq[c] += static_cast<double>(q[c]) + delta * delta * cross;
          }
          n = total;
        }
        counts[t] = n;
      });
    });
  } else {
    // One chunk per (n, c) plane, stored as chunk n of channel c.
    chunks = g.n;
    counts.assign(chunks, g.s);
    means.assign(chunks * C, 0.0);
    m2s.assign(chunks * C, 0.0);
    at::parallel_for(0, g.n * C, std::max<int64_t>(1, kChunkElems / g.s), [&](int64_t p0,
                                                                               int64_t p1) {
      with_best_isa([&]() FASTRES_INLINE {
        for (int64_t p = p0; p < p1; ++p) {
          const scalar_t* __restrict plane = x + p * g.s;
          acc_t sum[1];
          lane_sums<acc_t, 1>(g.s, [&](int64_t i, auto& l, int j) FASTRES_INLINE {
            l[0][j] += static_cast<acc_t>(plane[i]);
          }, sum);
          const acc_t mean = sum[0] / static_cast<acc_t>(g.s);
          acc_t q[1];
          lane_sums<acc_t, 1>(g.s, [&](int64_t i, auto& l, int j) FASTRES_INLINE {
            const acc_t d = static_cast<acc_t>(plane[i]) - mean;
            l[0][j] += d * d;
          }, q);
          const acc_t m2 = q[0];
          means[p] = mean;  // p = n * C + c: chunk n, channel c
          m2s[p] = m2;
        }
      });
    });
  }
  at::parallel_for(0, C, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double n = 0, mean = 0, m2 = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        if (counts[k] == 0) continue;  // a thread without chunks
        const double nb = static_cast<double>(counts[k]);
        const double mb = means[k * C + c], qb = m2s[k * C + c];
        const double total = n + nb;
        const double delta = mb - mean;
        mean += delta * nb / total;
        m2 += qb + delta * delta * n * nb / total;
        n = total;
      }
      mean_out[c] = static_cast<acc_t>(mean);
      m2_out[c] = static_cast<acc_t>(m2);
    }
  });
}

std::tuple<Tensor, Tensor> bn_stats_cpu(const Tensor& x_in, int64_t /*variant: CUDA only*/) {
  const StatsArgs a = prepare_stats(x_in);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "bn_stats", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    stats_kernel<scalar_t, acc_t>(a.x.const_data_ptr<scalar_t>(), a.g, a.mean.data_ptr<acc_t>(),
                                  a.m2.data_ptr<acc_t>());
  });
  return {a.mean, a.m2};
}

// ---------------------------------------------------------------------------------------------
// bn_finalize

std::tuple<Tensor, Tensor, Tensor> bn_finalize_cpu(const Tensor& mean_in, const Tensor& m2_in,
                                                   int64_t count,
                                                   const std::optional<Tensor>& weight,
                                                   const std::optional<Tensor>& bias,
                                                   double eps) {
  const FinalizeArgs a = prepare_finalize(mean_in, m2_in, count, weight, bias);
  AT_DISPATCH_FLOATING_TYPES(a.mean.scalar_type(), "bn_finalize", [&] {
    const auto ptrs = finalize_pointers<scalar_t>(a);
    for (int64_t c = 0; c < a.c; ++c) math::finalize_channel(ptrs, count, eps, c);
  });
  return {a.scale, a.shift, a.invstd};
}

// ---------------------------------------------------------------------------------------------
// bn_finalize_update: bn_finalize, and the running statistics updated as nn.BatchNorm2d does.

std::tuple<Tensor, Tensor, Tensor> bn_finalize_update_cpu(
    const Tensor& mean_in, const Tensor& m2_in, int64_t count,
    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
    const Tensor& running_mean, const Tensor& running_var,
    const std::optional<Tensor>& num_batches_tracked, std::optional<double> momentum) {
  TORCH_CHECK(count > 1, "fastres: bn_finalize_update needs count > 1, got ", count);
  const FinalizeArgs a = prepare_finalize(mean_in, m2_in, count, weight, bias);
  check_running(a.mean, running_mean, running_var, num_batches_tracked, momentum);
  int64_t* nbt = num_batches_tracked ? num_batches_tracked->data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(a.mean.scalar_type(), "bn_finalize_update", [&] {
    using acc_t = scalar_t;
    const auto ptrs = finalize_pointers<acc_t>(a);
    const acc_t factor = math::running_factor<acc_t>(momentum.value_or(0.0),
                                                     !momentum.has_value(), nbt ? *nbt : 0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running_mean.scalar_type(),
                                    "bn_update_running", [&] {
      scalar_t* rm = running_mean.data_ptr<scalar_t>();
      scalar_t* rv = running_var.data_ptr<scalar_t>();
      for (int64_t c = 0; c < a.c; ++c) {
        math::finalize_channel(ptrs, count, eps, c);
        const math::Running<acc_t> old{static_cast<acc_t>(rm[c]), static_cast<acc_t>(rv[c])};
        const auto u = math::updated_running(ptrs.mean[c], ptrs.m2[c], count, factor, old);
        rm[c] = static_cast<scalar_t>(u.mean);
        rv[c] = static_cast<scalar_t>(u.var);
      }
    });
  });
  if (nbt) ++*nbt;
  return {a.scale, a.shift, a.invstd};
}

// ---------------------------------------------------------------------------------------------
// bn_apply

template <typename acc_t>
Tail<acc_t> tail_of(const Prepared& p) {
  return {p.scale.const_data_ptr<acc_t>(), p.shift.const_data_ptr<acc_t>(),
          p.scale_r.defined() ? p.scale_r.const_data_ptr<acc_t>() : nullptr,
          p.shift_r.defined() ? p.shift_r.const_data_ptr<acc_t>() : nullptr};
}

Tensor bn_apply_cpu(const Tensor& x_in, const Tensor& scale, const Tensor& shift,
                    const std::optional<Tensor>& residual, const std::optional<Tensor>& scale_r,
                    const std::optional<Tensor>& shift_r, bool relu,
                    int64_t /*variant: CUDA only*/) {
  const ApplyArgs a = prepare_apply(x_in, scale, shift, residual, scale_r, shift_r);
  const Prepared& p = a.p;
  const Geometry& g = p.g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "bn_apply", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tail<acc_t> t = tail_of<acc_t>(p);
    const scalar_t* x = p.x.const_data_ptr<scalar_t>();
    const scalar_t* r = p.r.defined() ? p.r.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* y = a.out.data_ptr<scalar_t>();
    dispatch_tail(p.r.defined(), p.scale_r.defined(), relu, [&](auto hr, auto hs, auto rl) {
      constexpr bool HR = decltype(hr)::value, HS = decltype(hs)::value, RL = decltype(rl)::value;
      auto store = [&](int64_t i, int64_t c) FASTRES_INLINE {
        const acc_t rv = HR ? static_cast<acc_t>(r[i]) : acc_t(0);
        const acc_t z = tail_at<acc_t, HR, HS>(static_cast<acc_t>(x[i]), rv, t.scale, t.shift,
                                               t.scale_r, t.shift_r, c);
        y[i] = static_cast<scalar_t>(RL && z < acc_t(0) ? acc_t(0) : z);
      };
      for_each_block(
          g,
          [&](int64_t base) FASTRES_INLINE {
FASTRES_NO_ALIAS
            for (int64_t c = 0; c < g.c; ++c) store(base + c, c);
          },
          [&](int64_t base, int64_t c) FASTRES_INLINE {
FASTRES_NO_ALIAS
            for (int64_t i = base; i < base + g.s; ++i) store(i, c);
          });
    });
  });
  return a.out;
}

// ---------------------------------------------------------------------------------------------
// bn_backward_reduce: sum_dy = sum g, sum_dy_xmu = sum g (x - mean),
// sum_dy_rmu = sum g (r - mean_r) with g = grad_out * relu_mask(z).

void backward_reduce(const BackwardReduceArgs& a, bool relu) {
  const Prepared& p = a.p;
  const Geometry& g = p.g;
  const int64_t C = g.c;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "bn_bwd_reduce",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tail<acc_t> t = tail_of<acc_t>(p);
    const scalar_t* x = p.x.const_data_ptr<scalar_t>();
    const scalar_t* r = p.r.defined() ? p.r.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* go = a.dy.const_data_ptr<scalar_t>();
    const acc_t* m = a.mean.const_data_ptr<acc_t>();
    const acc_t* mr = a.mean_r.const_data_ptr<acc_t>();
    // Partial sums [parts, 3, C] in fp64. Channels_last: one part per thread, to which the
    // thread adds the fp32 sums of each chunk of kChunkElems (a part per chunk would leave a
    // long serial merge); NCHW: one part per sample.
    const int64_t parts = g.channels_last ? at::get_num_threads() : g.n;
    std::vector<double> part(std::max<int64_t>(parts, 1) * 3 * C, 0.0);
    dispatch_tail(p.r.defined(), p.scale_r.defined(), relu, [&](auto hr, auto hs, auto rl) {
      constexpr bool HR = decltype(hr)::value, HS = decltype(hs)::value, RL = decltype(rl)::value;
      if (g.channels_last) {
        const int64_t rows = g.n * g.s;
        const int64_t chunk_rows = std::max<int64_t>(1, kChunkElems / C);
        const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
        at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
          const int64_t tid = at::get_thread_num();
          TORCH_INTERNAL_ASSERT(tid < parts);
          std::vector<acc_t> buf(3 * C);
          with_best_isa([&]() FASTRES_INLINE {
            double* __restrict acc = part.data() + tid * 3 * C;
            acc_t* __restrict s0 = buf.data();
            for (int64_t k = k0; k < k1; ++k) {
              std::fill(buf.begin(), buf.end(), acc_t(0));
              const int64_t r1 = std::min(rows, (k + 1) * chunk_rows);
              for (int64_t row = k * chunk_rows; row < r1; ++row) {
                const int64_t base = row * C;
                reduce_row<scalar_t, acc_t, HR, HS, RL>(go + base, x + base,
                                                         HR ? r + base : nullptr, t, m, mr, s0,
                                                         s0 + C, s0 + 2 * C, C);
              }
              for (int64_t i = 0; i < 3 * C; ++i) acc[i] += static_cast<double>(s0[i]);
            }
          });
        });
      } else {
        at::parallel_for(0, g.n * C, std::max<int64_t>(1, kChunkElems / g.s),
                         [&](int64_t p0, int64_t p1) {
          with_best_isa([&]() FASTRES_INLINE {
            for (int64_t pl = p0; pl < p1; ++pl) {
              const int64_t n = pl / C, c = pl % C, base = pl * g.s;
              acc_t sums[3];
              reduce_plane<scalar_t, acc_t, HR, HS, RL>(go + base, x + base,
                                                         HR ? r + base : nullptr, t, c, m[c], mr[c],
                                                         g.s, sums);
              double* s = part.data() + n * 3 * C;
              s[c] = sums[0];
              s[C + c] = sums[1];
              s[2 * C + c] = sums[2];
            }
          });
        });
      }
    });
    acc_t* o0 = a.sum_dy.data_ptr<acc_t>();
    acc_t* o1 = a.sum_dy_xmu.data_ptr<acc_t>();
    acc_t* o2 = p.scale_r.defined() ? a.sum_dy_rmu.data_ptr<acc_t>() : nullptr;
    for (int64_t c = 0; c < C; ++c) {
      double a0 = 0, a1 = 0, a2 = 0;
      for (int64_t k = 0; k < parts; ++k) {
        const double* s = part.data() + k * 3 * C;
        a0 += s[c];
        a1 += s[C + c];
        a2 += s[2 * C + c];
      }
      o0[c] = static_cast<acc_t>(a0);
      o1[c] = static_cast<acc_t>(a1);
      if (o2) o2[c] = static_cast<acc_t>(a2);
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> bn_backward_reduce_cpu(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& residual, const std::optional<Tensor>& scale_r,
    const std::optional<Tensor>& shift_r, bool relu, const std::optional<Tensor>& mean,
    const std::optional<Tensor>& mean_r, int64_t /*variant: CUDA only*/) {
  const BackwardReduceArgs a = prepare_backward_reduce(grad_out, x_in, scale, shift, residual,
                                                       scale_r, shift_r, mean, mean_r);
  backward_reduce(a, relu);
  return {a.sum_dy, a.sum_dy_xmu, a.sum_dy_rmu};
}

// ---------------------------------------------------------------------------------------------
// bn_backward_elemt:
//   grad_x = scale * (g - sum_dy / count - (x - mean) * invstd^2 * sum_dy_xmu / count)
//            (training-mode BN: sum_dy given), else scale * g;
//   grad_r = g (no scale_r); scale_r * (g - sum_dy / count - (r - mean_r) * invstd_r^2 *
//            sum_dy_rmu / count) (sum_dy_rmu given); else scale_r * g.

// The coefficients (math::coef_channel), and the affine gradients where grads is given.
void backward_coefficients(const Prepared& p, const ElemtCoefficients& ec,
                           Tensor* grads = nullptr) {
  AT_DISPATCH_FLOATING_TYPES(p.acc, "bn_bwd_coef", [&] {
    const auto ptrs = ec.pointers<scalar_t>(p, grads);
    const auto flags = ec.flags(p);
    for (int64_t c = 0; c < p.g.c; ++c) math::coef_channel(ptrs, flags, c);
  });
}

// The element-wise pass, from the coefficients (backward_coefficients).
void backward_elemt(const Prepared& p, const Tensor& dy, const ElemtCoefficients& ec, bool relu,
                    const Tensor& grad_x, const Tensor& grad_r) {
  const Geometry& g = p.g;
  const int64_t C = g.c;
  const bool want_r = ec.want_r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.x.scalar_type(), "bn_bwd_elemt",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Tail<acc_t> t = tail_of<acc_t>(p);
    const scalar_t* x = p.x.const_data_ptr<scalar_t>();
    const scalar_t* r = p.r.defined() ? p.r.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* go = dy.const_data_ptr<scalar_t>();
    const acc_t* cf = ec.coef.const_data_ptr<acc_t>();
    const acc_t *A = cf, *B = cf + C, *K = cf + 2 * C, *AR = cf + 3 * C, *BR = cf + 4 * C,
                *KR = cf + 5 * C;
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    scalar_t* gr = want_r ? grad_r.data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto want_tag, auto tx_tag, auto tr_tag) {
      constexpr bool WR = decltype(want_tag)::value, TX = decltype(tx_tag)::value,
                     TR = decltype(tr_tag)::value;
      dispatch_tail(p.r.defined(), p.scale_r.defined(), relu, [&](auto hr, auto hs, auto rl) {
        constexpr bool HR = decltype(hr)::value, HS = decltype(hs)::value,
                       RL = decltype(rl)::value;
        for_each_block(
            g,
            [&](int64_t base) FASTRES_INLINE {
              elemt_span<scalar_t, acc_t, HR, HS, RL, WR, true, TX, TR>(
                  go + base, x + base, HR ? r + base : nullptr, t, A, B, K, AR, BR, KR, 0,
                  gx + base, WR ? gr + base : nullptr, C);
            },
            [&](int64_t base, int64_t c) FASTRES_INLINE {
              elemt_span<scalar_t, acc_t, HR, HS, RL, WR, false, TX, TR>(
                  go + base, x + base, HR ? r + base : nullptr, t, A, B, K, AR, BR, KR, c,
                  gx + base, WR ? gr + base : nullptr, g.s);
            });
      });
    };
    // train_r implies train_x (elemt_coefficients checks it): three cases, times want_r.
    auto run_terms = [&](auto want_tag) {
      if (ec.train_r) {
        run(want_tag, std::true_type{}, std::true_type{});
      } else if (ec.train_x) {
        run(want_tag, std::true_type{}, std::false_type{});
      } else {
        run(want_tag, std::false_type{}, std::false_type{});
      }
    };
    if (want_r) {
      run_terms(std::true_type{});
    } else {
      run_terms(std::false_type{});
    }
  });
}

std::tuple<Tensor, Tensor> bn_backward_elemt_cpu(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& residual, const std::optional<Tensor>& scale_r,
    const std::optional<Tensor>& shift_r, bool relu, const std::optional<Tensor>& mean,
    const std::optional<Tensor>& invstd, const std::optional<Tensor>& sum_dy,
    const std::optional<Tensor>& sum_dy_xmu, const std::optional<Tensor>& mean_r,
    const std::optional<Tensor>& invstd_r, const std::optional<Tensor>& sum_dy_rmu,
    int64_t count, bool grad_residual, int64_t /*variant: CUDA only*/) {
  const BackwardElemtArgs a = prepare_backward_elemt(
      grad_out, x_in, scale, shift, residual, scale_r, shift_r, mean, invstd, sum_dy, sum_dy_xmu,
      mean_r, invstd_r, sum_dy_rmu, count, grad_residual);
  backward_coefficients(a.p, a.ec);
  backward_elemt(a.p, a.dy, a.ec, relu, a.grad_x, a.grad_r);
  return {a.grad_x, a.grad_r};
}

// ---------------------------------------------------------------------------------------------
// bn_backward: bn_backward_reduce, the coefficients with the affine gradients, and
// bn_backward_elemt, in one op (one process's batch: no SyncBN sum between the two passes).

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> bn_backward_cpu(
    const Tensor& grad_out, const Tensor& x_in, const Tensor& scale, const Tensor& shift,
    const std::optional<Tensor>& residual, const std::optional<Tensor>& scale_r,
    const std::optional<Tensor>& shift_r, bool relu, const Tensor& mean, const Tensor& invstd,
    const std::optional<Tensor>& mean_r, const std::optional<Tensor>& invstd_r, int64_t count,
    bool grad_residual, int64_t /*variant: CUDA only*/) {
  BackwardArgs a = prepare_backward(grad_out, x_in, scale, shift, residual, scale_r, shift_r,
                                    mean, invstd, mean_r, invstd_r, count, grad_residual);
  backward_reduce(a.r, relu);
  backward_coefficients(a.r.p, a.ec, a.grads);
  backward_elemt(a.r.p, a.r.dy, a.ec, relu, a.grad_x, a.grad_r);
  return {a.grad_x, a.grad_r, a.grads[0], a.grads[1], a.grads[2], a.grads[3]};
}

// ---------------------------------------------------------------------------------------------
// add_relu_: y = ReLU(y + r) in place.

void add_relu_cpu(const Tensor& y, const Tensor& r) {
  if (!add_relu_flat(y, r)) {
    y.add_(r).relu_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "add_relu_", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    at::parallel_for(0, y.numel(), kChunkElems, [&](int64_t i0, int64_t i1) {
      with_best_isa([&]() FASTRES_INLINE {
FASTRES_NO_ALIAS
        for (int64_t i = i0; i < i1; ++i) {
          const acc_t z = static_cast<acc_t>(yp[i]) + static_cast<acc_t>(rp[i]);
          yp[i] = static_cast<scalar_t>(z < acc_t(0) ? acc_t(0) : z);  // NaN stays NaN
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastres, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_finalize", &bn_finalize_cpu);
  m.impl("bn_finalize_update", &bn_finalize_update_cpu);
  m.impl("bn_apply", &bn_apply_cpu);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cpu);
  m.impl("bn_backward_elemt", &bn_backward_elemt_cpu);
  m.impl("bn_backward", &bn_backward_cpu);
  m.impl("add_relu_", &add_relu_cpu);
}

}  // namespace fastres
