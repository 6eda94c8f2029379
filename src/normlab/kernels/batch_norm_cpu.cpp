// normlab's fused CPU batch norm: train forward, train backward, eval forward (+ optional leaky ReLU).
//
// Two memory layouts, chosen from the input's strides (see `layout_of`):
//   * NCS  — (N, C, S) contiguous (NCHW, NCL, NCDHW with S = prod(spatial) > 1).
//            Work is split over channels; one channel's N*S values are read once
//            from memory for the statistics and then again, mostly from L2, to
//            normalize (a channel of (32, 64, 112, 112) fp32 is 1.6 MB).
//   * ROWS — (M, C) contiguous with C fastest ((N, C) input, channels_last,
//            channels_last_3d, or NCS with S == 1). Work is split over rows; each
//            thread keeps per-channel accumulators that are merged at the end.
//
// Numerics (normlab's contract): statistics are sums of *shifted* values
// d = x - x0 (x0: the channel's first value), accumulated in float over short
// chunks and in double across chunks, so var = E[d^2] - E[d]^2 has no
// catastrophic cancellation even for data like 1e4 + N(0, 1). Outputs are
// formed as (x - mean) * scale + beta, never x * scale + shift, for the same
// reason. Statistics come back in float for fp32/bf16/fp16 input, double for
// double input.
//
// Backward (n values per channel, xc = x - mean):
//   dbeta  = sum(dy),  dgamma = invstd * sum(dy * xc)
//   dx     = k1 * dy + k2 * xc + k3,  k1 = gamma*invstd,
//            k2 = -gamma*invstd^2*sum(dy*xc)/n,  k3 = -k1*sum(dy)/n
// An activation (leaky ReLU with `slope`, ReLU as slope 0, or SiLU) is applied to y in the
// same pass; the backward recomputes z = (x - mean) * scale + beta from x and uses
// dy * f'(z) (the streaming AVX-512 paths fuse leaky ReLU only; SiLU takes the plain loops).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/native_batch_norm.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>  // pybind11 with the at::Tensor caster (lighter than torch/extension.h)
#include <torch/library.h>

#include <array>
#include <cstdint>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using at::Tensor;

template <typename T>
using acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

constexpr int64_t kChunk = 256;  // float partial sums over at most this many values

inline float load(const float v) { return v; }
inline double load(const double v) { return v; }
// bf16 -> fp32 is a shift; written out so that the compiler vectorizes it
inline float load(const c10::BFloat16 v) { return __builtin_bit_cast(float, uint32_t(v.x) << 16); }
inline float load(const c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline T store(acc_t<T> v) { return static_cast<T>(v); }

// fp32 -> bf16, round to nearest even (NaN stays NaN), branch-free for vectorization
template <>
inline c10::BFloat16 store<c10::BFloat16>(float v) {
  const uint32_t u = __builtin_bit_cast(uint32_t, v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : uint16_t(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// ---------- the activation fused after the affine map ----------
// ACT: kNone, kLeaky (leaky ReLU with `slope`; slope 0 is ReLU) or kSilu (z * sigmoid(z)).
// The backward recomputes z = xc * scale + beta from x and multiplies dy by f'(z).
constexpr int kNone = 0, kLeaky = 1, kSilu = 2;

// exp for float in a form the compiler vectorizes (no libm call in the loop): Cephes' expf,
// 2^n * p(r) with r = x - n*ln2 in [-ln2/2, ln2/2]; relative error below 1e-7.
// n is rounded by adding 1.5 * 2^23 (its integer then sits in the low mantissa bits), not
// with floorf: GCC keeps floorf scalar without -fno-trapping-math, which left the whole
// fused SiLU loop unvectorized (4x slower than torch's BN + SiLU; found by -fopt-info-vec).
inline float vexp(float x) {
  x = x < -87.33654f ? -87.33654f : x;  // NaN passes through both
  x = x > 88.37626f ? 88.37626f : x;
  const float big = x * 1.44269504088896341f + 12582912.0f;
  const float n = big - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = __builtin_bit_cast(int32_t, big) - 0x4B400000;  // n as an integer
  return p * __builtin_bit_cast(float, (e + 127) << 23);
}
inline double vexp(double x) { return std::exp(x); }

template <int ACT, typename A>
inline A act_fwd(A v, A slope) {
  if constexpr (ACT == kLeaky) return v > 0 ? v : v * slope;
  if constexpr (ACT == kSilu) return v / (A(1) + vexp(-v));
  return v;
}

// g * f'(z)
template <int ACT, typename A>
inline A act_grad(A g, A z, A slope) {
  if constexpr (ACT == kLeaky) return z > 0 ? g : g * slope;
  if constexpr (ACT == kSilu) {
    const A sig = A(1) / (A(1) + vexp(-z));
    return g * sig * (A(1) + z * (A(1) - sig));
  }
  return g;
}

// Calls f(std::integral_constant<int, ACT>) for the activation code passed from Python.
template <typename F>
void with_act(int64_t act, F&& f) {
  TORCH_CHECK(act == kNone || act == kLeaky || act == kSilu, "normlab fused: unknown activation code ", act);
  if (act == kLeaky) return f(std::integral_constant<int, kLeaky>{});
  if (act == kSilu) return f(std::integral_constant<int, kSilu>{});
  f(std::integral_constant<int, kNone>{});
}

enum class Layout { NCS, ROWS };

struct Shape {
  Layout layout;
  int64_t N, C, S;  // NCS: (N, C, S); ROWS: M = N * S rows of C
};

// The layout x is processed in; x may be replaced by a contiguous copy.
Shape layout_of(Tensor& x) {
  const int64_t C = x.size(1);
  const int64_t N = x.size(0);
  const int64_t S = C > 0 && N > 0 ? x.numel() / (N * C) : 0;
  if (x.dim() >= 4) {
    const auto fmt = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
    if (!x.is_contiguous() && x.is_contiguous(fmt)) return {Layout::ROWS, N, C, S};
  }
  if (!x.is_contiguous()) x = x.contiguous();
  if (S == 1) return {Layout::ROWS, N, C, 1};
  return {Layout::NCS, N, C, S};
}

Tensor like_layout(const Tensor& t, const Tensor& x) {
  // dy / outputs in x's layout
  if (x.is_contiguous()) return t.contiguous();
  const auto fmt = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  return t.contiguous(fmt);
}

// ---------- argument checks: no Python path can reach a kernel with a wrong shape ----------
void check_input(const Tensor& x, const char* what) {
  TORCH_CHECK(x.defined(), "normlab fused ", what, ": the input is undefined");
  TORCH_CHECK(x.device().is_cpu(), "normlab fused ", what, ": expected a CPU tensor, got ", x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "normlab fused ", what,
                   ": expected a floating-point input, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 2, "normlab fused ", what, ": expected (N, C, *) input, got ", x.dim(), "D");
}

// A per-channel tensor (may be absent): CPU, floating point, `expected` elements.
void check_channels(const std::optional<Tensor>& t, int64_t expected, const char* name) {
  if (!t || !t->defined()) return;
  TORCH_CHECK(t->device().is_cpu(), name, " must be a CPU tensor, got ", t->device());
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), name, " must be a floating-point tensor, got ",
                   t->scalar_type());
  TORCH_CHECK(t->numel() == expected, name, " should contain ", expected, " elements not ", t->numel());
}

void check_eps(double eps) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "batch_norm eps must be a non-negative finite number, got ", eps);
}

// Per-channel parameters (gamma, beta) in double, with defaults.
std::vector<double> channel_param(const std::optional<Tensor>& t, int64_t C, double fill) {
  std::vector<double> out(C, fill);
  if (t && t->defined()) {
    TORCH_CHECK(t->numel() == C, "normlab fused batch_norm: a per-channel tensor has ", t->numel(),
                " elements, expected ", C);
    auto f = t->to(at::kDouble).contiguous();
    const double* p = f.data_ptr<double>();
    for (int64_t c = 0; c < C; ++c) out[c] = p[c];
  }
  return out;
}

// ---------- reductions over one contiguous run ----------
// s += sum(x - shift), q += sum((x - shift)^2)
template <typename T>
inline void shifted_sums(const T* p, int64_t len, acc_t<T> shift, double& s, double& q) {
  using A = acc_t<T>;
  for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
    const int64_t i1 = std::min(len, i0 + kChunk);
    A cs = 0, cq = 0;
#pragma omp simd reduction(+ : cs, cq)
    for (int64_t i = i0; i < i1; ++i) {
      const A d = load(p[i]) - shift;
      cs += d;
      cq += d * d;
    }
    s += cs;
    q += cq;
  }
}

// a += sum(g), b += sum(g * (x - mean)) with g = dy * f'(z)
template <typename T, int ACT>
inline void grad_sums(const T* dy, const T* x, int64_t len, acc_t<T> mean, acc_t<T> scale, acc_t<T> beta,
                      acc_t<T> slope, double& a, double& b) {
  using A = acc_t<T>;
  for (int64_t i0 = 0; i0 < len; i0 += kChunk) {
    const int64_t i1 = std::min(len, i0 + kChunk);
    A ca = 0, cb = 0;
#pragma omp simd reduction(+ : ca, cb)
    for (int64_t i = i0; i < i1; ++i) {
      const A xc = load(x[i]) - mean;
      const A g = act_grad<ACT>(load(dy[i]), xc * scale + beta, slope);
      ca += g;
      cb += g * xc;
    }
    a += ca;
    b += cb;
  }
}

// y = act((x - shift) * scale + bias). In training shift is a value of the batch (x - shift is
// exact near it) and bias = beta - (mean - shift) * scale, formed in double: no cancellation of
// large values, one operand fewer than ((x - shift) - (mean - shift)) * scale + beta.
template <typename T, int ACT>
inline void normalize_run(const T* x, T* y, int64_t len, acc_t<T> shift, acc_t<T> scale, acc_t<T> beta,
                          acc_t<T> slope) {
  using A = acc_t<T>;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float> && ACT != kSilu) {  // short runs (7x7 planes): a masked tail
    const __m512 sh = _mm512_set1_ps(shift), sc = _mm512_set1_ps(scale);
    const __m512 b = _mm512_set1_ps(beta), sl = _mm512_set1_ps(slope);
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 m = len - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (len - i)) - 1);
      const __m512 xc = _mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), sh);
      __m512 v = _mm512_fmadd_ps(xc, sc, b);
      if constexpr (ACT == kLeaky) {
        const __mmask16 pos = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
        v = _mm512_mask_blend_ps(pos, _mm512_mul_ps(v, sl), v);
      }
      _mm512_mask_storeu_ps(y + i, m, v);
    }
    return;
  }
#endif
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    y[i] = store<T>(act_fwd<ACT>((load(x[i]) - shift) * scale + beta, slope));
  }
}

// dx = k1 * g + k2 * (x - mean) + k3
template <typename T, int ACT>
inline void grad_input_run(const T* dy, const T* x, T* dx, int64_t len, acc_t<T> mean, acc_t<T> scale,
                           acc_t<T> beta, acc_t<T> slope, acc_t<T> k1, acc_t<T> k2, acc_t<T> k3) {
  using A = acc_t<T>;
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const A xc = load(x[i]) - mean;
    const A g = act_grad<ACT>(load(dy[i]), xc * scale + beta, slope);
    dx[i] = store<T>(k1 * g + k2 * xc + k3);
  }
}


// ---------- streaming (non-temporal) stores for fp32 outputs larger than the caches ----------
// A regular store first reads the destination line (read-for-ownership): an output
// that will not be re-read from cache costs twice its size in traffic. Streaming
// stores write it once. Used only for fp32 and outputs above kStreamBytes.
constexpr int64_t kStreamBytes = int64_t(8) << 20;

#if defined(__AVX512F__)
constexpr bool kHaveStream = true;

template <bool ACT>
inline __m512 act16(__m512 v, __m512 slope) {
  if constexpr (ACT) {
    const __mmask16 pos = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
    return _mm512_mask_blend_ps(pos, _mm512_mul_ps(v, slope), v);
  }
  return v;
}

template <bool ACT>
inline float act1(float v, float slope) {
  if constexpr (ACT) return v > 0 ? v : v * slope;
  return v;
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline void stream16(float* p, __m512 v) { _mm512_stream_ps(p, v); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#if defined(__AVX512BF16__)
constexpr bool kStreamBf16 = true;
inline void stream16(c10::BFloat16* p, __m512 v) {  // round to nearest even, like store<BFloat16>
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(v));
}
#else
constexpr bool kStreamBf16 = false;
inline void stream16(c10::BFloat16*, __m512) {}
#endif

// y[i] = act((x[i] - shift[i]) * scale[i] + beta[i]) (see normalize_run); per-channel operands
// are arrays indexed with stride `cs` (0: one channel for the whole run, 1: a row of channels).
template <typename T, bool ACT>
inline void normalize_stream(const T* x, T* y, int64_t len, const float* shift, const float* scale,
                             const float* beta, int64_t cs, float slope) {
  int64_t i = 0;
  auto one = [&](int64_t k) {
    const int64_t c = k * cs;
    y[k] = store<T>(act1<ACT>((load(x[k]) - shift[c]) * scale[c] + beta[c], slope));
  };
  for (; i < len && (reinterpret_cast<uintptr_t>(y + i) & 63); ++i) one(i);
  const __m512 vsl = _mm512_set1_ps(slope);
  for (; i + 16 <= len; i += 16) {
    __m512 sh, sc, b;
    if (cs) {
      sh = _mm512_loadu_ps(shift + i), sc = _mm512_loadu_ps(scale + i), b = _mm512_loadu_ps(beta + i);
    } else {
      sh = _mm512_set1_ps(*shift), sc = _mm512_set1_ps(*scale), b = _mm512_set1_ps(*beta);
    }
    const __m512 xc = _mm512_sub_ps(load16(x + i), sh);
    stream16(y + i, act16<ACT>(_mm512_fmadd_ps(xc, sc, b), vsl));
  }
  for (; i < len; ++i) one(i);
}

// Eval on NCS with short planes: runs j0..j1 (run j = (n, c = j % C), S values each) are
// contiguous, so the thread streams whole aligned vectors across run boundaries; a
// vector that straddles two runs blends the two channels' parameters (S >= 16).
template <bool ACT>
inline void eval_ncs_stream(const float* x, float* y, int64_t j0, int64_t j1, int64_t S, int64_t C,
                            const float* mean, const float* scale, const float* beta, float slope) {
  const int64_t end = j1 * S;
  int64_t p = j0 * S, j = j0;
  auto one = [&](int64_t q) {
    while (q >= (j + 1) * S) ++j;
    const int64_t c = j % C;
    y[q] = act1<ACT>((x[q] - mean[c]) * scale[c] + beta[c], slope);
  };
  for (; p < end && (reinterpret_cast<uintptr_t>(y + p) & 63); ++p) one(p);
  const __m512 vsl = _mm512_set1_ps(slope);
  for (; p + 16 <= end; p += 16) {
    while (p >= (j + 1) * S) ++j;
    const int64_t c = j % C, next = (j + 1) * S;
    __m512 m = _mm512_set1_ps(mean[c]), sc = _mm512_set1_ps(scale[c]), b = _mm512_set1_ps(beta[c]);
    if (next < p + 16) {
      const int64_t c2 = (j + 1) % C;
      const __mmask16 hi = __mmask16(0xFFFFu << (next - p));
      m = _mm512_mask_blend_ps(hi, m, _mm512_set1_ps(mean[c2]));
      sc = _mm512_mask_blend_ps(hi, sc, _mm512_set1_ps(scale[c2]));
      b = _mm512_mask_blend_ps(hi, b, _mm512_set1_ps(beta[c2]));
    }
    const __m512 xc = _mm512_sub_ps(_mm512_loadu_ps(x + p), m);
    _mm512_stream_ps(y + p, act16<ACT>(_mm512_fmadd_ps(xc, sc, b), vsl));
  }
  for (; p < end; ++p) one(p);
  _mm_sfence();
}

// dx[i] = k1 * g + k2 * (x - mean) + k3, g = dy (leaky-ReLU-masked with ACT)
template <bool ACT>
inline void grad_input_stream(const float* dy, const float* x, float* dx, int64_t len, const float* mean,
                              const float* scale, const float* beta, const float* k1, const float* k2,
                              const float* k3, int64_t cs, float slope) {
  int64_t i = 0;
  auto one = [&](int64_t k) {
    const int64_t c = k * cs;
    const float xc = x[k] - mean[c];
    float g = dy[k];
    if constexpr (ACT) g = (xc * scale[c] + beta[c]) > 0 ? g : g * slope;
    dx[k] = k1[c] * g + k2[c] * xc + k3[c];
  };
  for (; i < len && (reinterpret_cast<uintptr_t>(dx + i) & 63); ++i) one(i);
  const __m512 vsl = _mm512_set1_ps(slope);
  for (; i + 16 <= len; i += 16) {
    __m512 m, a, b2, c;
    if (cs) {
      m = _mm512_loadu_ps(mean + i), a = _mm512_loadu_ps(k1 + i), b2 = _mm512_loadu_ps(k2 + i), c = _mm512_loadu_ps(k3 + i);
    } else {
      m = _mm512_set1_ps(*mean), a = _mm512_set1_ps(*k1), b2 = _mm512_set1_ps(*k2), c = _mm512_set1_ps(*k3);
    }
    const __m512 xc = _mm512_sub_ps(_mm512_loadu_ps(x + i), m);
    __m512 g = _mm512_loadu_ps(dy + i);
    if constexpr (ACT) {
      const __m512 sc = cs ? _mm512_loadu_ps(scale + i) : _mm512_set1_ps(*scale);
      const __m512 b = cs ? _mm512_loadu_ps(beta + i) : _mm512_set1_ps(*beta);
      const __mmask16 pos = _mm512_cmp_ps_mask(_mm512_fmadd_ps(xc, sc, b), _mm512_setzero_ps(), _CMP_GT_OQ);
      g = _mm512_mask_blend_ps(pos, _mm512_mul_ps(g, vsl), g);
    }
    _mm512_stream_ps(dx + i, _mm512_fmadd_ps(a, g, _mm512_fmadd_ps(b2, xc, c)));
  }
  for (; i < len; ++i) one(i);
}
#else
constexpr bool kHaveStream = false;
constexpr bool kStreamBf16 = false;
#endif

// Streaming pays off only when whole cache lines are written by vector stores: a
// partial line (unaligned head/tail of a short run) written with streaming stores
// next to regular ones costs far more than it saves. So: long NCS runs, or runs
// (planes, rows) that are a whole number of 64-byte lines.
template <typename T>
bool use_stream(const Tensor& out, const Shape& sh) {
  constexpr bool can = std::is_same_v<T, float> || (std::is_same_v<T, c10::BFloat16> && kStreamBf16);
  const int64_t run = sh.layout == Layout::NCS ? sh.S : sh.C;  // values between channel changes
  const bool line_multiple = (run * int64_t(sizeof(T))) % 64 == 0;
  const bool whole_lines = sh.layout == Layout::NCS ? sh.S >= 1024 || (line_multiple && sh.S >= 64) : line_multiple;
  return kHaveStream && can && whole_lines && out.numel() * int64_t(sizeof(T)) > kStreamBytes;
}

inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// Per-row variants over C channels, with per-channel arrays.
template <typename T>
inline void rows_shifted_sums(const T* x, int64_t rows, int64_t C, const acc_t<T>* shift, double* s,
                              double* q, acc_t<T>* cs, acc_t<T>* cq) {
  using A = acc_t<T>;
  for (int64_t r0 = 0; r0 < rows; r0 += 64) {
    const int64_t r1 = std::min(rows, r0 + 64);
    std::fill(cs, cs + C, A(0));
    std::fill(cq, cq + C, A(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T* p = x + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A d = load(p[c]) - shift[c];
        cs[c] += d;
        cq[c] += d * d;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      s[c] += cs[c];
      q[c] += cq[c];
    }
  }
}

template <typename T, int ACT>
inline void rows_grad_sums(const T* dy, const T* x, int64_t rows, int64_t C, const acc_t<T>* mean,
                           const acc_t<T>* scale, const acc_t<T>* beta, acc_t<T> slope, double* a, double* b,
                           acc_t<T>* ca, acc_t<T>* cb) {
  using A = acc_t<T>;
  for (int64_t r0 = 0; r0 < rows; r0 += 64) {
    const int64_t r1 = std::min(rows, r0 + 64);
    std::fill(ca, ca + C, A(0));
    std::fill(cb, cb + C, A(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T* px = x + r * C;
      const T* pg = dy + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A xc = load(px[c]) - mean[c];
        const A g = act_grad<ACT>(load(pg[c]), xc * scale[c] + beta[c], slope);
        ca[c] += g;
        cb[c] += g * xc;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      a[c] += ca[c];
      b[c] += cb[c];
    }
  }
}

template <typename T, int ACT>
inline void rows_normalize(const T* x, T* y, int64_t r0, int64_t r1, int64_t C, const acc_t<T>* shift,
                           const acc_t<T>* scale, const acc_t<T>* beta, acc_t<T> slope) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* px = x + r * C;
    T* py = y + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      py[c] = store<T>(act_fwd<ACT>((load(px[c]) - shift[c]) * scale[c] + beta[c], slope));
    }
  }
}

template <typename T, int ACT>
inline void rows_grad_input(const T* dy, const T* x, T* dx, int64_t r0, int64_t r1, int64_t C,
                            const acc_t<T>* mean, const acc_t<T>* scale, const acc_t<T>* beta, acc_t<T> slope,
                            const acc_t<T>* k1, const acc_t<T>* k2, const acc_t<T>* k3) {
  using A = acc_t<T>;
  for (int64_t r = r0; r < r1; ++r) {
    const T* px = x + r * C;
    const T* pg = dy + r * C;
    T* pd = dx + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      const A xc = load(px[c]) - mean[c];
      const A g = act_grad<ACT>(load(pg[c]), xc * scale[c] + beta[c], slope);
      pd[c] = store<T>(k1[c] * g + k2[c] * xc + k3[c]);
    }
  }
}

// Row-wise reduction over M rows with per-thread accumulators; returns (C,) sums a, b.
template <typename T, typename F>
void rows_reduce(int64_t M, int64_t C, std::vector<double>& a, std::vector<double>& b, F body) {
  const int nt = at::get_num_threads();
  std::vector<double> pa(static_cast<size_t>(nt) * C, 0.0), pb(static_cast<size_t>(nt) * C, 0.0);
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(C, 1));
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    const int tid = at::get_thread_num();
    std::vector<acc_t<T>> ca(C), cb(C);
    body(r0, r1, pa.data() + tid * C, pb.data() + tid * C, ca.data(), cb.data());
  });
  a.assign(C, 0.0);
  b.assign(C, 0.0);
  for (int t = 0; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) {
      a[c] += pa[t * C + c];
      b[c] += pb[t * C + c];
    }
}

// ---------- per-channel moments (shared by the train forward and the stats-only pass) ----------
struct Moments {
  double dm;   // mean - shift
  double var;  // biased variance
};

inline Moments moments(double s, double q, double n) {
  const double dm = s / n;
  const double var = q / n - dm * dm;
  return {dm, var < 0.0 ? 0.0 : var};  // NaN stays NaN (std::max(0, NaN) is 0), as in torch
}

// A non-finite shift would turn an Inf mean into NaN (Inf - Inf): shift by 0 then, as torch.
template <typename A>
inline A finite_or_zero(A v) { return std::isfinite(v) ? v : A(0); }

// ---------- short NCS runs (planes of 7x7 to 15x15), fp32 and bf16 ----------
// A channel's N runs of S < kShortRun values: the generic loops pay a vector remainder and,
// for the sums, a horizontal reduction per run (more than the 3-4 vectors of a 7x7 plane).
// These keep vector accumulators across a channel's runs and load the tail under a mask.
constexpr int64_t kShortRun = 256;
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#define NORMLAB_SHORT_RUNS 1  // the masked short-run paths below are compiled
#else
#define NORMLAB_SHORT_RUNS 0
#endif
#if NORMLAB_SHORT_RUNS
template <typename T>
constexpr bool kShortRunsFast = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

inline __mmask16 tail_mask(int64_t left) { return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1); }
inline __m512 load16m(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16m(const c10::BFloat16* p, __mmask16 m) {
  const __m256i raw = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline void store16m(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16m(c10::BFloat16* p, __mmask16 m, __m512 v) {  // round to nearest even
  _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
inline double hsum(__m512 v) { return static_cast<double>(_mm512_reduce_add_ps(v)); }

// vexp for 16 lanes, the same steps (NaN passes: max/min return their second operand then)
inline __m512 vexp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-87.33654f), x);
  x = _mm512_min_ps(_mm512_set1_ps(88.37626f), x);
  const __m512 big = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(12582912.0f));
  const __m512 n = _mm512_sub_ps(big, _mm512_set1_ps(12582912.0f));
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500E-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_sub_epi32(_mm512_castps_si512(big), _mm512_set1_epi32(0x4B400000));
  return _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(e, _mm512_set1_epi32(127)), 23)));
}

// act_fwd / act_grad for 16 lanes
template <int ACT>
inline __m512 act_fwd16(__m512 v, __m512 slope) {
  if constexpr (ACT == kLeaky) {
    const __mmask16 pos = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
    return _mm512_mask_blend_ps(pos, _mm512_mul_ps(v, slope), v);
  }
  if constexpr (ACT == kSilu) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(v, _mm512_add_ps(one, vexp16(_mm512_sub_ps(_mm512_setzero_ps(), v))));
  }
  return v;
}

template <int ACT>
inline __m512 act_grad16(__m512 g, __m512 z, __m512 slope) {
  if constexpr (ACT == kLeaky) {
    const __mmask16 pos = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ);
    return _mm512_mask_blend_ps(pos, _mm512_mul_ps(g, slope), g);
  }
  if constexpr (ACT == kSilu) {
    const __m512 one = _mm512_set1_ps(1.0f);
    const __m512 sig = _mm512_div_ps(one, _mm512_add_ps(one, vexp16(_mm512_sub_ps(_mm512_setzero_ps(), z))));
    return _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_fmadd_ps(z, _mm512_sub_ps(one, sig), one));
  }
  return g;
}

// s, q of channel c over its N runs; float lanes flushed to double every ~256 values per lane
template <typename T>
inline void ncs_short_sums(const T* px, int64_t N, int64_t C, int64_t S, int64_t c, float shift, double& s,
                           double& q) {
  const __m512 sh = _mm512_set1_ps(shift);
  const int64_t flush = std::max<int64_t>(1, (16 * kChunk) / S);  // runs per float partial sum
  for (int64_t i0 = 0; i0 < N; i0 += flush) {
    __m512 vs = _mm512_setzero_ps(), vq = _mm512_setzero_ps();
    for (int64_t i = i0; i < std::min(N, i0 + flush); ++i) {
      const T* p = px + (i * C + c) * S;
      for (int64_t k = 0; k < S; k += 16) {
        const __mmask16 m = tail_mask(S - k);
        const __m512 d = _mm512_maskz_sub_ps(m, load16m(p + k, m), sh);
        vs = _mm512_add_ps(vs, d);
        vq = _mm512_fmadd_ps(d, d, vq);
      }
    }
    s += hsum(vs);
    q += hsum(vq);
  }
}

// a += sum(g), b += sum(g * (x - mean)) of channel c over its N runs, g = dy * f'(z)
template <typename T, int ACT>
inline void ncs_short_grad_sums(const T* dy, const T* x, int64_t N, int64_t C, int64_t S, int64_t c, float mean,
                                float scale, float beta, float slope, double& a, double& b) {
  const __m512 mu = _mm512_set1_ps(mean), sc = _mm512_set1_ps(scale), be = _mm512_set1_ps(beta);
  const __m512 sl = _mm512_set1_ps(slope);
  const int64_t flush = std::max<int64_t>(1, (16 * kChunk) / S);
  for (int64_t i0 = 0; i0 < N; i0 += flush) {
    __m512 va = _mm512_setzero_ps(), vb = _mm512_setzero_ps();
    for (int64_t i = i0; i < std::min(N, i0 + flush); ++i) {
      const int64_t off = (i * C + c) * S;
      for (int64_t k = 0; k < S; k += 16) {
        const __mmask16 m = tail_mask(S - k);
        const __m512 xc = _mm512_maskz_sub_ps(m, load16m(x + off + k, m), mu);
        const __m512 g = act_grad16<ACT>(load16m(dy + off + k, m), _mm512_fmadd_ps(xc, sc, be), sl);
        va = _mm512_add_ps(va, g);
        vb = _mm512_fmadd_ps(g, xc, vb);
      }
    }
    a += hsum(va);
    b += hsum(vb);
  }
}

// dx = k1 * g + k2 * (x - mean) + k3 over one run, the tail masked
template <typename T, int ACT>
inline void short_grad_input_run(const T* dy, const T* x, T* dx, int64_t len, float mean, float scale,
                                 float beta, float slope, float k1, float k2, float k3) {
  const __m512 mu = _mm512_set1_ps(mean), sc = _mm512_set1_ps(scale), be = _mm512_set1_ps(beta);
  const __m512 sl = _mm512_set1_ps(slope), a1 = _mm512_set1_ps(k1), a2 = _mm512_set1_ps(k2), a3 = _mm512_set1_ps(k3);
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 m = tail_mask(len - k);
    const __m512 xc = _mm512_sub_ps(load16m(x + k, m), mu);
    const __m512 g = act_grad16<ACT>(load16m(dy + k, m), _mm512_fmadd_ps(xc, sc, be), sl);
    store16m(dx + k, m, _mm512_fmadd_ps(a1, g, _mm512_fmadd_ps(a2, xc, a3)));
  }
}

// y = act((x - shift) * scale + bias) over one run, the tail masked
template <typename T, int ACT>
inline void short_normalize_run(const T* x, T* y, int64_t len, float shift, float scale, float bias, float slope) {
  const __m512 sh = _mm512_set1_ps(shift), sc = _mm512_set1_ps(scale), b = _mm512_set1_ps(bias);
  const __m512 sl = _mm512_set1_ps(slope);
  for (int64_t k = 0; k < len; k += 16) {
    const __mmask16 m = tail_mask(len - k);
    store16m(y + k, m, act_fwd16<ACT>(_mm512_fmadd_ps(_mm512_sub_ps(load16m(x + k, m), sh), sc, b), sl));
  }
}
#else
template <typename T>
constexpr bool kShortRunsFast = false;
#endif

// NCS channel c: shifted sums over its N runs of S values, shift = its first value.
template <typename T>
inline Moments ncs_moments(const T* px, int64_t N, int64_t C, int64_t S, int64_t c, acc_t<T>& shift) {
  shift = finite_or_zero(load(px[c * S]));
  double s = 0, q = 0;
#if NORMLAB_SHORT_RUNS
  if constexpr (kShortRunsFast<T>) {
    if (S < kShortRun) {
      ncs_short_sums<T>(px, N, C, S, c, shift, s, q);
      return moments(s, q, static_cast<double>(N) * S);
    }
  }
#endif
  for (int64_t i = 0; i < N; ++i) shifted_sums<T>(px + (i * C + c) * S, S, shift, s, q);
  return moments(s, q, static_cast<double>(N) * S);
}

#if defined(__AVX512F__)
// Short rows (C = 16·V channels, V <= 8: channels_last stages of 16-128 channels): two
// per-channel sums stay in registers across rows instead of a load and a store of each
// accumulator per row (the generic loop ran at ~2.3-2.6x a read-only sum there, this one at
// ~1.1x). With V <= 2 two sets for alternate rows, so that consecutive adds do not wait on each
// other. Float partial sums over at most 64 rows are flushed into the double totals, as in
// rows_shifted_sums. step(a, b, r, v) adds row r's vector v into the accumulators a and b.
template <int V, typename Step>
inline void rows_short_sums(int64_t rows, Step step, double* s, double* q) {
  constexpr int64_t C = 16 * V;
  constexpr int K = V <= 2 ? 2 : 1;  // accumulator sets
  alignas(64) float ts[C], tq[C];
  for (int64_t r0 = 0; r0 < rows; r0 += 64) {
    const int64_t r1 = std::min(rows, r0 + 64);
    __m512 a[K][V], b[K][V];
    for (int k = 0; k < K; ++k)
      for (int v = 0; v < V; ++v) a[k][v] = b[k][v] = _mm512_setzero_ps();
    int64_t r = r0;
    for (; r + K <= r1; r += K)
      for (int k = 0; k < K; ++k)
        for (int v = 0; v < V; ++v) step(a[k][v], b[k][v], r + k, v);
    for (; r < r1; ++r)
      for (int v = 0; v < V; ++v) step(a[0][v], b[0][v], r, v);
    for (int v = 0; v < V; ++v) {
      for (int k = 1; k < K; ++k) {
        a[0][v] = _mm512_add_ps(a[0][v], a[k][v]);
        b[0][v] = _mm512_add_ps(b[0][v], b[k][v]);
      }
      _mm512_store_ps(ts + 16 * v, a[0][v]);
      _mm512_store_ps(tq + 16 * v, b[0][v]);
    }
    for (int64_t c = 0; c < C; ++c) {
      s[c] += ts[c];
      q[c] += tq[c];
    }
  }
}

// The statistics: s += x - shift, q += (x - shift)^2
template <typename T, int V>
inline void rows_shifted_sums_short(const T* x, int64_t rows, const float* shift, double* s, double* q) {
  __m512 sh[V];
  for (int v = 0; v < V; ++v) sh[v] = _mm512_loadu_ps(shift + 16 * v);
  rows_short_sums<V>(rows, [&](__m512& a, __m512& b, int64_t r, int v) {
    const __m512 d = _mm512_sub_ps(load16(x + (r * V + v) * 16), sh[v]);
    a = _mm512_add_ps(a, d);
    b = _mm512_fmadd_ps(d, d, b);
  }, s, q);
}

// The backward's sums, plain batch norm: a += dy, b += dy·(x - mean)
template <typename T, int V>
inline void rows_grad_sums_short(const T* dy, const T* x, int64_t rows, const float* mean, double* a, double* b) {
  __m512 mu[V];
  for (int v = 0; v < V; ++v) mu[v] = _mm512_loadu_ps(mean + 16 * v);
  rows_short_sums<V>(rows, [&](__m512& sa, __m512& sb, int64_t r, int v) {
    const int64_t i = (r * V + v) * 16;
    const __m512 g = load16(dy + i);
    sa = _mm512_add_ps(sa, g);
    sb = _mm512_fmadd_ps(g, _mm512_sub_ps(load16(x + i), mu[v]), sb);
  }, a, b);
}

// Calls f(std::integral_constant<int, V>) for C = 16·V channels, V <= 8; false for other C.
template <typename F>
inline bool with_short_rows(int64_t C, F f) {
  if (C % 16 != 0 || C < 16 || C > 128) return false;
  switch (C / 16) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
  return true;
}

template <typename T>
inline bool rows_grad_sums_fast(const T* dy, const T* x, int64_t rows, int64_t C, const float* mean, double* a,
                                double* b) {
  return with_short_rows(C, [&](auto v) { rows_grad_sums_short<T, decltype(v)::value>(dy, x, rows, mean, a, b); });
}

template <typename T>
inline bool rows_shifted_sums_fast(const T* x, int64_t rows, int64_t C, const float* shift, double* s, double* q) {
  return with_short_rows(C, [&](auto v) { rows_shifted_sums_short<T, decltype(v)::value>(x, rows, shift, s, q); });
}
#endif

// ROWS: M rows of C channels; shift[c] = the first row's value.
template <typename T>
std::vector<Moments> rows_moments(const T* px, int64_t M, int64_t C, std::vector<acc_t<T>>& shift) {
  using A = acc_t<T>;
  shift.resize(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = finite_or_zero(load(px[c]));
  std::vector<double> s, q;
  rows_reduce<T>(M, C, s, q, [&](int64_t r0, int64_t r1, double* ps, double* pq, A* cs, A* cq) {
#if defined(__AVX512F__)
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
      if (rows_shifted_sums_fast<T>(px + r0 * C, r1 - r0, C, shift.data(), ps, pq)) return;
    }
#endif
    rows_shifted_sums<T>(px + r0 * C, r1 - r0, C, shift.data(), ps, pq, cs, cq);
  });
  std::vector<Moments> out(C);
  for (int64_t c = 0; c < C; ++c) out[c] = moments(s[c], q[c], static_cast<double>(M));
  return out;
}

// Batch chunks normalized each with its own statistics (Ghost BN's virtual batches): sizes along
// dim 0 that sum to N; none = one chunk of N. A batch slice keeps x's layout, so each chunk runs
// the ordinary kernels on a view: no copies, and the loop over chunks stays in C++.
std::vector<int64_t> chunk_sizes(const at::OptionalIntArrayRef& chunks, int64_t N) {
  if (!chunks) return {N};
  std::vector<int64_t> sizes = chunks->vec();
  int64_t total = 0;
  for (const int64_t n : sizes) {
    TORCH_CHECK(n >= 1, "normlab fused batch_norm: chunk sizes must be positive");
    total += n;
  }
  TORCH_CHECK(total == N, "normlab fused batch_norm: chunk sizes sum to ", total, ", expected the batch size ", N);
  return sizes;
}

// ====================== train forward ======================
template <typename T, int ACT>
void forward_train_impl(const Tensor& x, const Shape& sh, Tensor& y, const std::vector<double>& gamma,
                        const std::vector<double>& beta, double eps, double slope, Tensor& mean_t, Tensor& var_t,
                        Tensor& invstd_t, const std::vector<int64_t>& sizes) {
  using A = acc_t<T>;
  const T* px = x.data_ptr<T>();
  T* py = y.data_ptr<T>();
  A* pm = mean_t.data_ptr<A>();
  A* pv = var_t.data_ptr<A>();
  A* pi = invstd_t.data_ptr<A>();
  const int64_t C = sh.C, S = sh.S, G = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> starts(G, 0);  // first sample of each chunk
  for (int64_t g = 1; g < G; ++g) starts[g] = starts[g - 1] + sizes[g - 1];
  const bool stream = ACT != kSilu && use_stream<T>(y, sh);  // the streaming paths fuse leaky ReLU only
  if (sh.layout == Layout::NCS) {
    // one parallel region over every (chunk, channel): a chunk's channel is N_g runs of S values
    at::parallel_for(0, G * C, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t g = j / C, c = j % C, N = sizes[g];
        const T* pxg = px + starts[g] * C * S;
        T* pyg = py + starts[g] * C * S;
        A shift;
        const auto [dm, var] = ncs_moments<T>(pxg, N, C, S, c, shift);
        const double invstd = 1.0 / std::sqrt(var + eps);
        const A mean = static_cast<A>(shift + dm);
        pm[j] = mean;
        pv[j] = static_cast<A>(var);
        pi[j] = static_cast<A>(invstd);
        const A scale = static_cast<A>(gamma[c] * invstd);
        const A bias = static_cast<A>(beta[c] - dm * gamma[c] * invstd);
        for (int64_t i = 0; i < N; ++i) {
          const int64_t off = (i * C + c) * S;
#if defined(__AVX512F__)
          if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
            if (stream) {
              normalize_stream<T, ACT == kLeaky>(pxg + off, pyg + off, S, &shift, &scale, &bias, 0, float(slope));
              continue;
            }
          }
#endif
#if NORMLAB_SHORT_RUNS
          if constexpr (kShortRunsFast<T>) {
            if (S < kShortRun) {
              short_normalize_run<T, ACT>(pxg + off, pyg + off, S, shift, scale, bias, float(slope));
              continue;
            }
          }
#endif
          normalize_run<T, ACT>(pxg + off, pyg + off, S, shift, scale, bias, static_cast<A>(slope));
        }
      }
      if (stream) stream_fence();
    });
    return;
  }
  for (int64_t g = 0; g < G; ++g) {  // ROWS: a chunk is M_g = N_g * S consecutive rows of C
    const int64_t M = sizes[g] * S;
    const T* pxg = px + starts[g] * S * C;
    T* pyg = py + starts[g] * S * C;
    std::vector<A> shift, scale(C), bet(C);
    const auto mom = rows_moments<T>(pxg, M, C, shift);
    for (int64_t c = 0; c < C; ++c) {
      const auto [dm, var] = mom[c];
      const double invstd = 1.0 / std::sqrt(var + eps);
      pm[g * C + c] = static_cast<A>(shift[c] + dm);
      pv[g * C + c] = static_cast<A>(var);
      pi[g * C + c] = static_cast<A>(invstd);
      scale[c] = static_cast<A>(gamma[c] * invstd);
      bet[c] = static_cast<A>(beta[c] - dm * gamma[c] * invstd);
    }
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(C, 1));
    at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
        if (stream) {
          for (int64_t r = r0; r < r1; ++r)
            normalize_stream<T, ACT == kLeaky>(pxg + r * C, pyg + r * C, C, shift.data(), scale.data(),
                                               bet.data(), 1, float(slope));
          stream_fence();
          return;
        }
      }
#endif
      rows_normalize<T, ACT>(pxg, pyg, r0, r1, C, shift.data(), scale.data(), bet.data(), static_cast<A>(slope));
    });
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_train(const Tensor& input, const std::optional<Tensor>& weight,
                                                         const std::optional<Tensor>& bias, double eps,
                                                         int64_t act, double slope,
                                                         at::OptionalIntArrayRef chunks) {
  check_input(input, "forward_train");
  TORCH_CHECK(input.numel() > 0, "normlab fused batch_norm: empty input");
  check_channels(weight, input.size(1), "weight");
  check_channels(bias, input.size(1), "bias");
  check_eps(eps);
  Tensor x = input;
  const Shape sh = layout_of(x);
  const auto sizes = chunk_sizes(chunks, sh.N);
  const int64_t G = static_cast<int64_t>(sizes.size());
  Tensor y = at::empty_like(x);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = x.options().dtype(acc);
  // (G·C,): chunk-major, one row of C per chunk
  Tensor mean = at::empty({G * sh.C}, opts), var = at::empty({G * sh.C}, opts), invstd = at::empty({G * sh.C}, opts);
  const auto gamma = channel_param(weight, sh.C, 1.0);
  const auto beta = channel_param(bias, sh.C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_fused_forward_train", [&] {
    with_act(act, [&](auto code) {
      forward_train_impl<scalar_t, decltype(code)::value>(x, sh, y, gamma, beta, eps, slope, mean, var, invstd, sizes);
    });
  });
  return {y, mean, var, invstd};
}

// ====================== statistics only ======================
// (mean, biased var) per channel: the forward's reduction without the normalize pass. Batch
// Renormalization needs the batch statistics before it can pick its affine correction.
template <typename T>
void stats_impl(const Tensor& x, const Shape& sh, Tensor& mean_t, Tensor& var_t) {
  using A = acc_t<T>;
  const T* px = x.data_ptr<T>();
  A* pm = mean_t.data_ptr<A>();
  A* pv = var_t.data_ptr<A>();
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  if (sh.layout == Layout::NCS) {
    at::parallel_for(0, C, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        A shift;
        const auto [dm, var] = ncs_moments<T>(px, N, C, S, c, shift);
        pm[c] = static_cast<A>(shift + dm);
        pv[c] = static_cast<A>(var);
      }
    });
    return;
  }
  std::vector<A> shift;
  const auto mom = rows_moments<T>(px, N * S, C, shift);
  for (int64_t c = 0; c < C; ++c) {
    pm[c] = static_cast<A>(shift[c] + mom[c].dm);
    pv[c] = static_cast<A>(mom[c].var);
  }
}

std::tuple<Tensor, Tensor> stats(const Tensor& input) {
  check_input(input, "stats");
  TORCH_CHECK(input.numel() > 0, "normlab fused batch_norm: empty input");
  Tensor x = input;
  const Shape sh = layout_of(x);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto opts = x.options().dtype(acc);
  Tensor mean = at::empty({sh.C}, opts), var = at::empty({sh.C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_fused_stats",
                                  [&] { stats_impl<scalar_t>(x, sh, mean, var); });
  return {mean, var};
}

// ====================== train backward ======================
// sdy, sdyxc: (G·C,) sums of g and g·(x − mean) per chunk and channel
template <typename T, int ACT>
void backward_train_impl(const Tensor& dy, const Tensor& x, const Shape& sh, const std::vector<double>& gamma,
                         const std::vector<double>& beta, const Tensor& mean_t, const Tensor& invstd_t, double slope,
                         Tensor* dx, std::vector<double>& sdy, std::vector<double>& sdyxc,
                         const std::vector<int64_t>& sizes) {
  using A = acc_t<T>;
  const T* px = x.data_ptr<T>();
  const T* pg = dy.data_ptr<T>();
  T* pd = dx ? dx->data_ptr<T>() : nullptr;
  auto mean64 = mean_t.to(at::kDouble).contiguous();
  auto inv64 = invstd_t.to(at::kDouble).contiguous();
  const double* pm = mean64.data_ptr<double>();
  const double* pi = inv64.data_ptr<double>();
  const int64_t C = sh.C, S = sh.S, G = static_cast<int64_t>(sizes.size());
  std::vector<int64_t> starts(G, 0);
  for (int64_t g = 1; g < G; ++g) starts[g] = starts[g - 1] + sizes[g - 1];
  const A sl = static_cast<A>(slope);
  const bool stream = ACT != kSilu && dx && use_stream<T>(*dx, sh);
  sdy.assign(G * C, 0.0);
  sdyxc.assign(G * C, 0.0);
  if (sh.layout == Layout::NCS) {
    at::parallel_for(0, G * C, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t g = j / C, c = j % C, N = sizes[g], base = starts[g] * C * S;
        const double n = static_cast<double>(N) * S;
        const A mean = static_cast<A>(pm[j]);
        const A scale = static_cast<A>(gamma[c] * pi[j]);
        double a = 0, b = 0;
        bool summed = false;
#if NORMLAB_SHORT_RUNS
        if constexpr (kShortRunsFast<T>) {
          if (S < kShortRun) {
            ncs_short_grad_sums<T, ACT>(pg + base, px + base, N, C, S, c, mean, scale, float(beta[c]), sl, a, b);
            summed = true;
          }
        }
#endif
        for (int64_t i = 0; i < N && !summed; ++i) {
          const int64_t off = base + (i * C + c) * S;
          grad_sums<T, ACT>(pg + off, px + off, S, mean, scale, beta[c], sl, a, b);
        }
        sdy[j] = a;
        sdyxc[j] = b;
        if (!pd) continue;
        const double k1 = gamma[c] * pi[j];
        const A k2 = static_cast<A>(-k1 * pi[j] * pi[j] * b / n);
        const A k3 = static_cast<A>(-k1 * a / n);
        const A kk1 = static_cast<A>(k1), bb = beta[c];
        for (int64_t i = 0; i < N; ++i) {
          const int64_t off = base + (i * C + c) * S;
#if defined(__AVX512F__)
          if constexpr (std::is_same_v<T, float>) {
            if (stream) {
              grad_input_stream<ACT == kLeaky>(pg + off, px + off, pd + off, S, &mean, &scale, &bb, &kk1, &k2, &k3, 0,
                                               sl);
              continue;
            }
          }
#endif
#if NORMLAB_SHORT_RUNS
          if constexpr (kShortRunsFast<T>) {
            if (S < kShortRun) {
              short_grad_input_run<T, ACT>(pg + off, px + off, pd + off, S, mean, scale, float(beta[c]), sl, kk1, k2, k3);
              continue;
            }
          }
#endif
          grad_input_run<T, ACT>(pg + off, px + off, pd + off, S, mean, scale, beta[c], sl, static_cast<A>(k1), k2,
                                 k3);
        }
      }
      if (stream) stream_fence();
    });
    return;
  }
  for (int64_t g = 0; g < G; ++g) {  // ROWS: a chunk is M_g = N_g * S consecutive rows of C
    const int64_t M = sizes[g] * S, base = starts[g] * S * C;
    const double n = static_cast<double>(M);
    const T* pxg = px + base;
    const T* pgg = pg + base;
    T* pdg = pd ? pd + base : nullptr;
    std::vector<A> mean(C), scale(C), bet(C), k1(C), k2(C), k3(C);
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = static_cast<A>(pm[g * C + c]);
      scale[c] = static_cast<A>(gamma[c] * pi[g * C + c]);
      bet[c] = beta[c];
    }
    std::vector<double> a, b;
    rows_reduce<T>(M, C, a, b, [&](int64_t r0, int64_t r1, double* pa, double* pb, A* ca, A* cb) {
#if defined(__AVX512F__)
      if constexpr (ACT == kNone && (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>)) {
        if (rows_grad_sums_fast<T>(pgg + r0 * C, pxg + r0 * C, r1 - r0, C, mean.data(), pa, pb)) return;
      }
#endif
      rows_grad_sums<T, ACT>(pgg + r0 * C, pxg + r0 * C, r1 - r0, C, mean.data(), scale.data(), bet.data(), sl, pa,
                             pb, ca, cb);
    });
    std::copy(a.begin(), a.end(), sdy.begin() + g * C);
    std::copy(b.begin(), b.end(), sdyxc.begin() + g * C);
    if (!pdg) continue;
    for (int64_t c = 0; c < C; ++c) {
      const double p = pi[g * C + c], kk1 = gamma[c] * p;
      k1[c] = static_cast<A>(kk1);
      k2[c] = static_cast<A>(-kk1 * p * p * b[c] / n);
      k3[c] = static_cast<A>(-kk1 * a[c] / n);
    }
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(C, 1));
    at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float>) {
        if (stream) {
          for (int64_t r = r0; r < r1; ++r)
            grad_input_stream<ACT == kLeaky>(pgg + r * C, pxg + r * C, pdg + r * C, C, mean.data(), scale.data(),
                                             bet.data(), k1.data(), k2.data(), k3.data(), 1, sl);
          stream_fence();
          return;
        }
      }
#endif
      rows_grad_input<T, ACT>(pgg, pxg, pdg, r0, r1, C, mean.data(), scale.data(), bet.data(), sl, k1.data(),
                              k2.data(), k3.data());
    });
  }
}

std::tuple<Tensor, Tensor, Tensor> backward_train(const Tensor& grad_out, const Tensor& input,
                                                  const std::optional<Tensor>& weight,
                                                  const std::optional<Tensor>& bias, const Tensor& mean,
                                                  const Tensor& invstd, int64_t act, double slope,
                                                  std::array<bool, 3> needs, at::OptionalIntArrayRef chunks) {
  check_input(input, "backward_train");
  TORCH_CHECK(input.numel() > 0, "normlab fused batch_norm: empty input");
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "normlab fused backward_train: the gradient has shape ",
              grad_out.sizes(), ", the input ", input.sizes());
  TORCH_CHECK(grad_out.device().is_cpu(), "normlab fused backward_train: the gradient must be a CPU tensor");
  check_channels(weight, input.size(1), "weight");
  check_channels(bias, input.size(1), "bias");
  Tensor x = input;
  const Shape sh = layout_of(x);
  const auto sizes = chunk_sizes(chunks, sh.N);
  const int64_t G = static_cast<int64_t>(sizes.size());
  check_channels(mean, G * sh.C, "mean");
  check_channels(invstd, G * sh.C, "invstd");
  Tensor dy = like_layout(grad_out.to(x.scalar_type()), x);
  const auto gamma = channel_param(weight, sh.C, 1.0);
  const auto beta = channel_param(bias, sh.C, 0.0);
  auto inv64 = invstd.to(at::kDouble).contiguous();
  Tensor dx;
  if (needs[0]) dx = at::empty_like(x);
  std::vector<double> sdy, sdyxc, dw_sum(sh.C, 0.0), db_sum(sh.C, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_fused_backward_train", [&] {
    Tensor* out = needs[0] ? &dx : nullptr;
    with_act(act, [&](auto code) {
      backward_train_impl<scalar_t, decltype(code)::value>(dy, x, sh, gamma, beta, mean, invstd, slope, out, sdy, sdyxc,
                                                           sizes);
    });
  });
  const double* pi = inv64.data_ptr<double>();
  for (int64_t j = 0; j < G * sh.C; ++j) {  // γ and β gradients: summed over the chunks
    dw_sum[j % sh.C] += sdyxc[j] * pi[j];
    db_sum[j % sh.C] += sdy[j];
  }
  Tensor dw, db;
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto to_tensor = [&](const std::vector<double>& v) {
    Tensor t = at::empty({sh.C}, x.options().dtype(at::kDouble));
    std::copy(v.begin(), v.end(), t.data_ptr<double>());
    return t.to(acc);
  };
  if (needs[1]) dw = to_tensor(dw_sum);
  if (needs[2]) db = to_tensor(db_sum);
  return {dx, dw, db};
}

// ====================== eval forward ======================
template <typename T, int ACT>
void forward_eval_impl(const Tensor& x, const Shape& sh, Tensor& y, const std::vector<double>& mean,
                       const std::vector<double>& scale, const std::vector<double>& beta, double slope) {
  using A = acc_t<T>;
  const T* px = x.data_ptr<T>();
  T* py = y.data_ptr<T>();
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  const A sl = static_cast<A>(slope);
  const bool stream = ACT != kSilu && use_stream<T>(y, sh);  // the streaming paths fuse leaky ReLU only
  std::vector<A> m(C), s(C), b(C);
  for (int64_t c = 0; c < C; ++c) {
    m[c] = static_cast<A>(mean[c]);
    s[c] = static_cast<A>(scale[c]);
    b[c] = beta[c];
  }
  const bool ncs = sh.layout == Layout::NCS;
  // NCS: one (n, c) run of S values per item; ROWS: one row of C channels per item
  const int64_t items = ncs ? N * C : N * S, len = ncs ? S : C, cs = ncs ? 0 : 1;
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(len, 1));
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    if (ACT != kSilu && ncs && !stream && S >= 16 && y.numel() * int64_t(sizeof(float)) > kStreamBytes) {
      at::parallel_for(0, items, grain, [&](int64_t j0, int64_t j1) {
        eval_ncs_stream<ACT == kLeaky>(px, py, j0, j1, S, C, m.data(), s.data(), b.data(), float(slope));
      });
      return;
    }
  }
#endif
  at::parallel_for(0, items, grain, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t c = ncs ? j % C : 0;
#if defined(__AVX512F__)
      if constexpr (std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>) {
        if (stream) {
          normalize_stream<T, ACT == kLeaky>(px + j * len, py + j * len, len, &m[c], &s[c], &b[c], cs, float(slope));
          continue;
        }
      }
#endif
      if (!ncs) {
        rows_normalize<T, ACT>(px, py, j, j + 1, C, m.data(), s.data(), b.data(), sl);
        continue;
      }
#if NORMLAB_SHORT_RUNS
      if constexpr (kShortRunsFast<T>) {
        if (S < kShortRun) {
          short_normalize_run<T, ACT>(px + j * len, py + j * len, len, m[c], s[c], b[c], float(slope));
          continue;
        }
      }
#endif
      normalize_run<T, ACT>(px + j * len, py + j * len, len, m[c], s[c], b[c], sl);
    }
    if (stream) stream_fence();
  });
}

// ====================== BN + leaky ReLU: the input from the output ======================
// x = mean + (u - beta) / (gamma * invstd), u = y for y > 0 else y / slope (slope 1: identity).
// InPlace-ABN keeps only the output y; its backward rebuilds x in this one pass and then runs the
// ordinary fused backward. gamma must already be kept away from 0 by the caller.
template <typename T>
void invert_act_impl(const Tensor& y, const Shape& sh, Tensor& x, const std::vector<double>& mean,
                     const std::vector<double>& inv_scale, const std::vector<double>& beta, double slope) {
  using A = acc_t<T>;
  const T* py = y.data_ptr<T>();
  T* px = x.data_ptr<T>();
  const A inv_slope = static_cast<A>(1.0 / slope);
  const int64_t N = sh.N, C = sh.C, S = sh.S;
  if (sh.layout == Layout::NCS) {
    at::parallel_for(0, N * C, 1, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t c = j % C;
        const A m = static_cast<A>(mean[c]), k = static_cast<A>(inv_scale[c]), b = static_cast<A>(beta[c]);
        const T* src = py + j * S;
        T* dst = px + j * S;
#pragma omp simd
        for (int64_t i = 0; i < S; ++i) {
          const A v = load(src[i]);
          dst[i] = store<T>(m + (std::max(v, A(0)) + std::min(v, A(0)) * inv_slope - b) * k);  // branch-free
        }
      }
    });
    return;
  }
  std::vector<A> m(C), k(C), b(C);
  for (int64_t c = 0; c < C; ++c) {
    m[c] = static_cast<A>(mean[c]);
    k[c] = static_cast<A>(inv_scale[c]);
    b[c] = static_cast<A>(beta[c]);
  }
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(C, 1));
  at::parallel_for(0, N * S, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* src = py + r * C;
      T* dst = px + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A v = load(src[c]);
        dst[c] = store<T>(m[c] + (std::max(v, A(0)) + std::min(v, A(0)) * inv_slope - b[c]) * k[c]);
      }
    }
  });
}

Tensor invert_act(const Tensor& output, const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
                  const std::optional<Tensor>& bias, double slope) {
  check_input(output, "invert_act");
  TORCH_CHECK(slope > 0, "normlab fused invert_act: the activation must be invertible (slope > 0)");
  check_channels(mean, output.size(1), "mean");
  check_channels(invstd, output.size(1), "invstd");
  check_channels(weight, output.size(1), "weight");
  check_channels(bias, output.size(1), "bias");
  Tensor y = output;
  if (y.numel() == 0) return at::empty_like(y);
  const Shape sh = layout_of(y);
  Tensor x = at::empty_like(y);
  const auto m = channel_param(mean, sh.C, 0.0);
  const auto inv = channel_param(invstd, sh.C, 1.0);
  const auto gamma = channel_param(weight, sh.C, 1.0);
  const auto beta = channel_param(bias, sh.C, 0.0);
  std::vector<double> inv_scale(sh.C);
  for (int64_t c = 0; c < sh.C; ++c) inv_scale[c] = 1.0 / (gamma[c] * inv[c]);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "normlab_fused_invert_act",
                                  [&] { invert_act_impl<scalar_t>(y, sh, x, m, inv_scale, beta, slope); });
  return x;
}

Tensor forward_eval(const Tensor& input, const Tensor& running_mean, const Tensor& running_var,
                    const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps,
                    int64_t act, double slope) {
  check_input(input, "forward_eval");
  check_channels(running_mean, input.size(1), "running_mean");
  check_channels(running_var, input.size(1), "running_var");
  check_channels(weight, input.size(1), "weight");
  check_channels(bias, input.size(1), "bias");
  check_eps(eps);
  Tensor x = input;
  if (x.numel() == 0) return at::empty_like(x);
  const Shape sh = layout_of(x);
  Tensor y = at::empty_like(x);
  auto rm = running_mean.to(at::kDouble).contiguous();
  auto rv = running_var.to(at::kDouble).contiguous();
  const auto gamma = channel_param(weight, sh.C, 1.0);
  const auto beta = channel_param(bias, sh.C, 0.0);
  std::vector<double> mean(sh.C), scale(sh.C);
  const double* prm = rm.data_ptr<double>();
  const double* prv = rv.data_ptr<double>();
  for (int64_t c = 0; c < sh.C; ++c) {
    mean[c] = prm[c];
    scale[c] = gamma[c] / std::sqrt(prv[c] + eps);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "normlab_fused_forward_eval", [&] {
    with_act(act, [&](auto code) {
      forward_eval_impl<scalar_t, decltype(code)::value>(x, sh, y, mean, scale, beta, slope);
    });
  });
  return y;
}

// ====================== ATen's training batch norm, guarding the running statistics ======================
// Plain batch norm on small inputs, where fixed costs rule: one pybind call from Python (a
// torch.ops call costs ~15 µs of boxing). ATen's native_batch_norm — its kernels, its autograd —
// normalizes and moves the running buffers in place, exactly as torch does. With `skip`, a
// channel whose batch statistics are not finite (mean NaN/Inf; invstd NaN, or 0 for var = Inf)
// gets its previous running statistics back. The restore, like the counter's increment, is a
// raw write that autograd does not see: native_batch_norm's training backward never reads the
// running buffers. momentum < 0 is the cumulative average 1/(num_batches_tracked + 1).
// Returns y, the batch mean and invstd, and how many channels were restored.
template <typename R>
void backup(const Tensor& t, std::vector<double>& out) {
  const R* p = t.data_ptr<R>();
  out.resize(t.numel());
  for (int64_t c = 0; c < t.numel(); ++c) out[c] = static_cast<double>(p[c]);
}

template <typename R>
void restore(Tensor& t, const std::vector<double>& from, const std::vector<bool>& bad) {
  R* p = t.data_ptr<R>();
  for (size_t c = 0; c < bad.size(); ++c)
    if (bad[c]) p[c] = static_cast<R>(from[c]);
}

// The step counter (absent: nullptr) and the momentum it implies: momentum < 0 is the
// cumulative average 1/(count + 1), which needs the counter.
int64_t* batch_counter(const std::optional<Tensor>& counter, double& momentum, const char* what) {
  int64_t* count = nullptr;
  if (counter && counter->defined()) {
    TORCH_CHECK(counter->device().is_cpu() && counter->scalar_type() == at::kLong && counter->numel() == 1,
                "normlab ", what, ": num_batches_tracked must be a CPU int64 scalar");
    count = counter->data_ptr<int64_t>();
  }
  if (momentum < 0) {
    TORCH_CHECK(count, "normlab ", what, ": momentum=None needs num_batches_tracked");
    momentum = 1.0 / static_cast<double>(*count + 1);
  }
  return count;
}

std::tuple<Tensor, Tensor, Tensor, int64_t> aten_train(const Tensor& input, const std::optional<Tensor>& weight,
                                                       const std::optional<Tensor>& bias, Tensor running_mean,
                                                       Tensor running_var, const std::optional<Tensor>& counter,
                                                       double momentum, double eps, bool skip) {
  check_input(input, "aten_train");
  const int64_t C = input.size(1);
  check_channels(running_mean, C, "running_mean");
  check_channels(running_var, C, "running_var");
  check_channels(weight, C, "weight");
  check_channels(bias, C, "bias");
  check_eps(eps);
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous() &&
                  running_mean.scalar_type() == running_var.scalar_type(),
              "normlab aten_train: running buffers must be contiguous and of one dtype");
  int64_t* count = batch_counter(counter, momentum, "aten_train");
  std::vector<double> old_mean, old_var;
  if (skip) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "normlab_backup", [&] {
      backup<scalar_t>(running_mean, old_mean);
      backup<scalar_t>(running_var, old_var);
    });
  }
  auto [y, mean, invstd] =
      at::native_batch_norm(input, weight, bias, running_mean, running_var, true, momentum, eps);
  int64_t restored = 0;
  if (skip) {
    std::vector<double> m, s;  // raw reads, no tensor op: ATen's statistics are contiguous (C,)
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, mean.scalar_type(), "normlab_stats", [&] {
      backup<scalar_t>(mean.contiguous(), m);
      backup<scalar_t>(invstd.contiguous(), s);
    });
    std::vector<bool> bad(C, false);
    for (int64_t c = 0; c < C; ++c) {
      bad[c] = !(std::isfinite(m[c]) && std::isfinite(s[c]) && s[c] > 0);
      restored += bad[c];
    }
    if (restored) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "normlab_restore", [&] {
        restore<scalar_t>(running_mean, old_mean, bad);
        restore<scalar_t>(running_var, old_var, bad);
      });
    }
  }
  if (count && restored < C) *count += 1;  // the batch counts when any channel moved
  return {y, mean, invstd, restored};
}

// ====================== the running statistics after a fused training step ======================
// running = (1 - f)·running + f·batch per channel (f = momentum, or 1/(count + 1) for momentum < 0),
// the variance taken as var·unbias (n/(n-1): the unbiased estimate). One call instead of ~8 tensor
// ops (~30 µs of dispatch on a small layer). policy 0 ("propagate"): every channel moves, as in
// torch; 1 ("skip"): a channel whose batch mean or variance is NaN/Inf keeps its running values;
// 2 ("raise"): nothing changes when any channel is non-finite (the caller raises). The counter
// counts the batch when any channel moved. Returns how many channels are non-finite.
// A channel is non-finite when its batch mean or variance·unbias is NaN/Inf in the buffers'
// dtype: an fp16 buffer cannot hold a variance of 1e5, which would poison it as Inf.
template <typename R>
inline bool finite_as(double v) {
  return std::isfinite(static_cast<double>(static_cast<R>(v)));
}

template <typename R, typename S>
int64_t update_running_impl(R* rm, R* rv, const S* m, const S* v, int64_t C, double f, double k, int64_t policy) {
  int64_t n_bad = 0;
  for (int64_t c = 0; c < C; ++c) n_bad += !(finite_as<R>(m[c]) && finite_as<R>(static_cast<double>(v[c]) * k));
  if (policy == 2 && n_bad) return n_bad;
  const double g = 1.0 - f;
  for (int64_t c = 0; c < C; ++c) {
    const double mc = static_cast<double>(m[c]), vc = static_cast<double>(v[c]) * k;
    if (policy != 0 && n_bad && !(finite_as<R>(mc) && finite_as<R>(vc))) continue;
    rm[c] = static_cast<R>(f == 1.0 ? mc : g * static_cast<double>(rm[c]) + f * mc);
    rv[c] = static_cast<R>(f == 1.0 ? vc : g * static_cast<double>(rv[c]) + f * vc);
  }
  return n_bad;
}

int64_t update_running(Tensor running_mean, Tensor running_var, const std::optional<Tensor>& counter,
                       const Tensor& mean, const Tensor& var, double momentum, double unbias, int64_t policy) {
  const int64_t C = running_mean.numel();
  TORCH_CHECK(running_mean.device().is_cpu() && running_var.device().is_cpu() && mean.device().is_cpu() &&
                  var.device().is_cpu(),
              "normlab update_running: CPU tensors only");
  TORCH_CHECK(running_mean.is_contiguous() && running_var.is_contiguous() &&
                  running_mean.scalar_type() == running_var.scalar_type() && running_var.numel() == C &&
                  mean.numel() == C && var.numel() == C && mean.scalar_type() == var.scalar_type(),
              "normlab update_running: running buffers and batch statistics must be (C,) tensors of matching dtypes");
  TORCH_CHECK(policy >= 0 && policy <= 2, "normlab update_running: policy must be 0, 1 or 2");
  int64_t* count = batch_counter(counter, momentum, "update_running");
  const Tensor m = mean.scalar_type() == at::kDouble ? mean.contiguous() : mean.to(at::kFloat).contiguous();
  const Tensor v = var.to(m.scalar_type()).contiguous();
  int64_t n_bad = 0;
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "normlab_update_stats", [&] {
    using S = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, running_mean.scalar_type(), "normlab_update_running", [&] {
      n_bad = update_running_impl<scalar_t, S>(running_mean.data_ptr<scalar_t>(), running_var.data_ptr<scalar_t>(),
                                               m.data_ptr<S>(), v.data_ptr<S>(), C, momentum, unbias, policy);
    });
  });
  if (policy == 2 && n_bad) return n_bad;
  // in-place writes, so bump the versions as torch's own in-place update does: a backward that
  // saved these tensors (an eval forward before this step) then fails loudly instead of reading
  // the new values
  running_mean.unsafeGetTensorImpl()->bump_version();
  running_var.unsafeGetTensorImpl()->bump_version();
  if (count && (policy == 0 || n_bad < C)) {
    *count += 1;
    counter->unsafeGetTensorImpl()->bump_version();
  }
  return n_bad;
}

// pybind entry points of the ops above: the same functions without torch.ops' boxing (~15 µs a
// call); torch.ops serve inside torch.compile.
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_train_py(const Tensor& input, const std::optional<Tensor>& weight,
                                                            const std::optional<Tensor>& bias, double eps,
                                                            int64_t act, double slope,
                                                            const std::optional<std::vector<int64_t>>& chunks) {
  return forward_train(input, weight, bias, eps, act, slope,
                       chunks ? at::OptionalIntArrayRef(*chunks) : at::OptionalIntArrayRef());
}

std::tuple<Tensor, Tensor, Tensor> backward_train_py(const Tensor& grad_out, const Tensor& input,
                                                     const std::optional<Tensor>& weight,
                                                     const std::optional<Tensor>& bias, const Tensor& mean,
                                                     const Tensor& invstd, int64_t act, double slope,
                                                     std::array<bool, 3> needs,
                                                     const std::optional<std::vector<int64_t>>& chunks) {
  return backward_train(grad_out, input, weight, bias, mean, invstd, act, slope, needs,
                        chunks ? at::OptionalIntArrayRef(*chunks) : at::OptionalIntArrayRef());
}

}  // namespace

TORCH_LIBRARY(normlab_fused, m) {
  m.def(
      "forward_train(Tensor x, Tensor? weight, Tensor? bias, float eps, int act, float slope, int[]? chunks=None) -> (Tensor, "
      "Tensor, Tensor, Tensor)");
  m.def(
      "backward_train(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor invstd, int act, float slope, "
      "bool[3] needs, int[]? chunks=None) -> (Tensor, Tensor, Tensor)");
  m.def("stats(Tensor x) -> (Tensor, Tensor)");
  m.def("invert_act(Tensor y, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, float slope) -> Tensor");
  m.def("forward_eval(Tensor x, Tensor running_mean, Tensor running_var, Tensor? weight, Tensor? bias, float eps, "
        "int act, float slope) -> Tensor");
}

TORCH_LIBRARY_IMPL(normlab_fused, CPU, m) {
  m.impl("forward_train", &forward_train);
  m.impl("backward_train", &backward_train);
  m.impl("forward_eval", &forward_eval);
  m.impl("stats", &stats);
  m.impl("invert_act", &invert_act);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "normlab's fused CPU batch norm (ops in torch.ops.normlab_fused; hot entry points here)";
  m.def("aten_train", &aten_train, "ATen's training batch norm with guarded running statistics");
  m.def("update_running", &update_running, "the running statistics' update after a fused training step");
  m.def("short_runs", [] { return kShortRunsFast<c10::BFloat16>; },
        "whether NCS planes under 256 values take the masked AVX-512 path (fp32 and bf16)");
  m.def("forward_train", &forward_train_py, "forward_train without torch.ops' boxing");
  m.def("backward_train", &backward_train_py, "backward_train without torch.ops' boxing");
  m.def("forward_eval", &forward_eval, "forward_eval without torch.ops' boxing");
  m.def("stats", &stats, "stats without torch.ops' boxing");
  m.def("invert_act", &invert_act, "invert_act without torch.ops' boxing");
}
