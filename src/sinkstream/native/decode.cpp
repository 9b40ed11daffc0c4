// sinkstream's CPU kernels for one-token decode steps (built at first use by native/__init__.py).
//
// A decode step of a small model is bound by how fast it streams its weights and its KV cache from
// memory. PyTorch's kernels for one-row products over int8 or bf16 weights convert more than they
// stream; these stream. Every op here has a reference in PyTorch that the tests compare it with.
//
//   packed_linear(x, w, scale, bias, acc)  x [M, K] f32 times packed weights (int8 + per-row scale,
//                                          or bf16) -> [M, N] f32; added into ``acc`` in place if given
//   rms_norm(x, w, eps)                    [M, D] f32
//   silu_mul(gu)                           [M, 2I] -> silu(gu[:, :I]) * gu[:, I:]
//   attend(...)                            rotary embedding of q and k, the new key/value written to
//                                          its cache slot, and one-query attention over the sinks and
//                                          the window of every batch row
//
// Packed weights: [N / 4][K / 8][4][8]. Four output rows are interleaved in blocks of eight inputs,
// so a tile of four rows is one contiguous stream that the hardware prefetcher follows, and each
// eight weights are converted once for every row of x.
//
// Built with -march=native: AVX2 + FMA paths where the CPU has them, portable loops elsewhere.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SS_AVX2 1
#else
#define SS_AVX2 0
#endif

namespace {

constexpr int64_t kRows = 4;   // output rows per tile
constexpr int64_t kBlock = 8;  // inputs per block

inline float bf16_to_float(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline float to_float(float v) { return v; }
inline float to_float(int8_t v) { return static_cast<float>(v); }
inline float to_float(uint16_t v) { return bf16_to_float(v); }
inline float to_float(at::Half v) { return static_cast<float>(v); }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }

#if SS_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const uint16_t* p) {  // bf16
  __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256 load8(const at::BFloat16* p) { return load8(reinterpret_cast<const uint16_t*>(p)); }

inline float hsum(__m256 v) {
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// exp for x <= 0 (attention weights after the max is subtracted): 2^n * p(r), |rel err| < 2e-7
inline __m256 exp_nonpos(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  x = _mm256_max_ps(x, lo);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// ---------------------------------------------------------------------------------------------
// packed linear

// MB rows of x against one tile (4 output rows) whose weights are W (int8, bf16, or f32 converted).
template <int MB, class W>
inline void tile_dot(const float* x, int64_t K, const W* w, float out[][kRows]) {
#if SS_AVX2
  __m256 acc[MB][kRows];
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < kRows; ++i) acc[m][i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += kBlock, w += kBlock * kRows) {
    __m256 wv[kRows];
    for (int i = 0; i < kRows; ++i) wv[i] = load8(w + kBlock * i);
    for (int m = 0; m < MB; ++m) {
      __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int i = 0; i < kRows; ++i) acc[m][i] = _mm256_fmadd_ps(xv, wv[i], acc[m][i]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < kRows; ++i) out[m][i] = hsum(acc[m][i]);
#else
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < kRows; ++i) out[m][i] = 0.f;
  for (int64_t k = 0; k < K; k += kBlock, w += kBlock * kRows)
    for (int i = 0; i < kRows; ++i)
      for (int m = 0; m < MB; ++m) {
        float s = 0.f;
        for (int j = 0; j < kBlock; ++j) s += x[m * K + k + j] * to_float(w[kBlock * i + j]);
        out[m][i] += s;
      }
#endif
}

// One row of x: two accumulator sets over alternate blocks, so that eight FMA chains run at once.
template <class W>
inline void tile_dot1(const float* x, int64_t K, const W* w, float out[][kRows]) {
#if SS_AVX2
  __m256 a0[kRows], a1[kRows];
  for (int i = 0; i < kRows; ++i) a0[i] = a1[i] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 2 * kBlock <= K; k += 2 * kBlock, w += 2 * kBlock * kRows) {
    __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + kBlock);
    for (int i = 0; i < kRows; ++i) a0[i] = _mm256_fmadd_ps(x0, load8(w + kBlock * i), a0[i]);
    for (int i = 0; i < kRows; ++i) a1[i] = _mm256_fmadd_ps(x1, load8(w + kBlock * (kRows + i)), a1[i]);
  }
  if (k < K) {
    __m256 x0 = _mm256_loadu_ps(x + k);
    for (int i = 0; i < kRows; ++i) a0[i] = _mm256_fmadd_ps(x0, load8(w + kBlock * i), a0[i]);
  }
  for (int i = 0; i < kRows; ++i) out[0][i] = hsum(_mm256_add_ps(a0[i], a1[i]));
#else
  tile_dot<1>(x, K, w, out);
#endif
}

template <int MB>
inline void store(float res[][kRows], int64_t m0, int64_t n0, int64_t N, const float* scale, const float* bias,
                  float* out, bool accumulate) {
  for (int m = 0; m < MB; ++m)
    for (int i = 0; i < kRows; ++i) {
      float v = res[m][i];
      if (scale) v *= scale[n0 + i];
      if (bias) v += bias[n0 + i];
      float& o = out[(m0 + m) * N + n0 + i];
      o = accumulate ? o + v : v;
    }
}

template <class W>
inline void convert(const W* w, float* out, int64_t n) {  // n % 8 == 0
#if SS_AVX2
  for (int64_t j = 0; j < n; j += kBlock) _mm256_storeu_ps(out + j, load8(w + j));
#else
  for (int64_t j = 0; j < n; ++j) out[j] = to_float(w[j]);
#endif
}

template <class W>
void linear_tiles(const float* x, int64_t M, int64_t K, int64_t N, const W* w, const float* scale,
                  const float* bias, float* out, bool accumulate, int64_t t0, int64_t t1) {
  std::vector<float> buf;  // a tile converted to f32 once, when many rows of x reuse it
  for (int64_t t = t0; t < t1; ++t) {
    const W* wt = w + t * kRows * K;
    const int64_t n0 = t * kRows;
    float res[2][kRows];
    if (M == 1) {
      tile_dot1(x, K, wt, res);
      store<1>(res, 0, n0, N, scale, bias, out, accumulate);
      continue;
    }
    if (M == 2) {
      tile_dot<2>(x, K, wt, res);
      store<2>(res, 0, n0, N, scale, bias, out, accumulate);
      continue;
    }
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {  // two rows at a time: eight accumulators, no register spills
      tile_dot<2>(x + m * K, K, wt, res);
      store<2>(res, m, n0, N, scale, bias, out, accumulate);
    }
    if (m < M) {
      tile_dot1(x + m * K, K, wt, res);
      store<1>(res, m, n0, N, scale, bias, out, accumulate);
    }
  }
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& scale,
                         const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& acc) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be [M, K] float32");
  TORCH_CHECK(w.dim() == 4 && w.size(2) == kRows && w.size(3) == kBlock && w.is_contiguous(),
              "w must be packed [N/4, K/8, 4, 8]");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0) * kRows;
  TORCH_CHECK(w.size(1) * kBlock == K, "x has ", K, " columns, the weights ", w.size(1) * kBlock);
  const bool is_int8 = w.scalar_type() == at::kChar;
  TORCH_CHECK(is_int8 || w.scalar_type() == at::kBFloat16, "packed weights are int8 or bfloat16");
  TORCH_CHECK(!is_int8 || (scale && scale->numel() == N && scale->scalar_type() == at::kFloat),
              "int8 weights need a float32 scale per output row");
  const float* sp = scale ? scale->data_ptr<float>() : nullptr;
  const float* bp = nullptr;
  if (bias) {
    TORCH_CHECK(bias->numel() == N && bias->scalar_type() == at::kFloat && bias->is_contiguous(), "bad bias");
    bp = bias->data_ptr<float>();
  }
  at::Tensor out;
  if (acc) {
    TORCH_CHECK(acc->sizes() == at::IntArrayRef({M, N}) && acc->scalar_type() == at::kFloat && acc->is_contiguous(),
                "acc must be [M, N] float32");
    out = *acc;
  } else {
    out = at::empty({M, N}, x.options());
  }
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const bool accumulate = acc.has_value();
  const int64_t tiles = N / kRows;
  at::parallel_for(0, tiles, 16, [&](int64_t t0, int64_t t1) {
    if (is_int8)
      linear_tiles(xp, M, K, N, w.data_ptr<int8_t>(), sp, bp, op, accumulate, t0, t1);
    else
      linear_tiles(xp, M, K, N, reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), sp, bp, op,
                   accumulate, t0, t1);
  });
  return out;
}

// Output rows [4 t0, 4 t1) of packed weights as float32 [rows, K] (times their scale): the block a
// many-row product (prefill) hands to PyTorch's matmul, converted in one pass.
at::Tensor dequantize_tiles(const at::Tensor& w, const c10::optional<at::Tensor>& scale, int64_t t0, int64_t t1) {
  TORCH_CHECK(w.dim() == 4 && w.size(2) == kRows && w.size(3) == kBlock && w.is_contiguous(), "w must be packed");
  TORCH_CHECK(0 <= t0 && t0 <= t1 && t1 <= w.size(0), "tiles out of range");
  const int64_t K = w.size(1) * kBlock, rows = (t1 - t0) * kRows;
  const bool is_int8 = w.scalar_type() == at::kChar;
  TORCH_CHECK(is_int8 || w.scalar_type() == at::kBFloat16, "packed weights are int8 or bfloat16");
  auto out = at::empty({rows, K}, w.options().dtype(at::kFloat));
  const float* sp = scale ? scale->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  auto run = [&](auto* wp) {
    at::parallel_for(t0, t1, 8, [&](int64_t a, int64_t b) {
      for (int64_t t = a; t < b; ++t)
        for (int64_t kb = 0; kb < K / kBlock; ++kb)
          for (int64_t i = 0; i < kRows; ++i) {
            const int64_t row = t * kRows + i;
            const auto* src = wp + ((t * (K / kBlock) + kb) * kRows + i) * kBlock;
            float* dst = op + (row - t0 * kRows) * K + kb * kBlock;
            const float sc = sp ? sp[row] : 1.0f;
#if SS_AVX2
            _mm256_storeu_ps(dst, _mm256_mul_ps(load8(src), _mm256_set1_ps(sc)));
#else
            for (int64_t j = 0; j < kBlock; ++j) dst[j] = to_float(src[j]) * sc;
#endif
          }
    });
  };
  if (is_int8)
    run(w.data_ptr<int8_t>());
  else
    run(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()));
  return out;
}

// ---------------------------------------------------------------------------------------------
// elementwise

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be [M, D] float32");
  const int64_t M = x.size(0), D = x.size(1);
  TORCH_CHECK(w.numel() == D && w.scalar_type() == at::kFloat && w.is_contiguous(), "bad norm weight");
  auto out = at::empty_like(x);
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xp + m * D;
    double ss = 0;
    for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(r[d]) * r[d];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / D) + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d) op[m * D + d] = (r[d] * inv) * wp[d];
  }
  return out;
}

at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(gu.dim() == 2 && gu.scalar_type() == at::kFloat && gu.is_contiguous() && gu.size(1) % 2 == 0,
              "gu must be [M, 2I] float32");
  const int64_t M = gu.size(0), I = gu.size(1) / 2;
  auto out = at::empty({M, I}, gu.options());
  const float* g = gu.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < I; ++i) {
      const float a = g[m * 2 * I + i], b = g[m * 2 * I + I + i];
      o[m * I + i] = a / (1.0f + std::exp(-a)) * b;
    }
  return out;
}

// ---------------------------------------------------------------------------------------------
// attention of one decode step

// rotate_half RoPE of one head in place: x[:rot] <- x * cos + rotate_half(x) * sin (cos/sin [rot])
inline void rope_head(float* x, const float* cos, const float* sin, int64_t rot) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

inline void head_norm(float* x, const float* w, int64_t D, float eps) {
  double ss = 0;
  for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(x[d]) * x[d];
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / D) + eps);
  for (int64_t d = 0; d < D; ++d) x[d] = (x[d] * inv) * w[d];
}

template <class T>
inline float dot(const float* q, const T* k, int64_t D) {
#if SS_AVX2
  if (D % 8 == 0) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k + d), a);
    return hsum(a);
  }
#endif
  float s = 0.f;
  for (int64_t d = 0; d < D; ++d) s += q[d] * to_float(k[d]);
  return s;
}

template <class T>
inline void axpy(float* o, float p, const T* v, int64_t D) {
#if SS_AVX2
  if (D % 8 == 0) {
    const __m256 pv = _mm256_set1_ps(p);
    for (int64_t d = 0; d < D; d += 8) _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pv, load8(v + d), _mm256_loadu_ps(o + d)));
    return;
  }
#endif
  for (int64_t d = 0; d < D; ++d) o[d] += p * to_float(v[d]);
}

// s[j] = q . K[j] for n keys of D dims (rows of K contiguous)
template <class T>
inline void scores(const float* q, const T* K, int64_t n, int64_t D, float* s) {
  int64_t j = 0;
#if SS_AVX2
  if (D % 8 == 0) {
    for (; j + 8 <= n; j += 8) {  // eight keys at once, reduced together
      __m256 a[8];
      for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, load8(K + (j + i) * D + d), a[i]);
      }
      const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
      const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
      const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
      _mm256_storeu_ps(s + j, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
    }
  }
#endif
  for (; j < n; ++j) s[j] = dot(q, K + j * D, D);
}

// o[0:D] += sum_j p[j] V[j] over n rows of V (D dims, contiguous)
template <int NV, class T>
inline void weighted_slab(const float* p, const T* V, int64_t n, int64_t D, float* o) {
#if SS_AVX2
  __m256 a[NV];
  for (int v = 0; v < NV; ++v) a[v] = _mm256_loadu_ps(o + 8 * v);
  for (int64_t j = 0; j < n; ++j) {
    const __m256 pv = _mm256_set1_ps(p[j]);
    for (int v = 0; v < NV; ++v) a[v] = _mm256_fmadd_ps(pv, load8(V + j * D + 8 * v), a[v]);
  }
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(o + 8 * v, a[v]);
#endif
}

template <class T>
inline void weighted_sum(const float* p, const T* V, int64_t n, int64_t D, float* o) {
  if (n <= 0) return;
#if SS_AVX2
  if (D % 8 == 0) {
    int64_t d = 0;
    for (; d + 64 <= D; d += 64) weighted_slab<8>(p, V + d, n, D, o + d);
    switch ((D - d) / 8) {
      case 7: weighted_slab<7>(p, V + d, n, D, o + d); break;
      case 6: weighted_slab<6>(p, V + d, n, D, o + d); break;
      case 5: weighted_slab<5>(p, V + d, n, D, o + d); break;
      case 4: weighted_slab<4>(p, V + d, n, D, o + d); break;
      case 3: weighted_slab<3>(p, V + d, n, D, o + d); break;
      case 2: weighted_slab<2>(p, V + d, n, D, o + d); break;
      case 1: weighted_slab<1>(p, V + d, n, D, o + d); break;
      default: break;
    }
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) axpy(o, p[j], V + j * D, D);
}

inline void exp_shifted(float* s, int64_t n, float mx) {  // s <- exp(s - mx)
  int64_t j = 0;
#if SS_AVX2
  const __m256 m = _mm256_set1_ps(mx);
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(s + j, exp_nonpos(_mm256_sub_ps(_mm256_loadu_ps(s + j), m)));
#endif
  for (; j < n; ++j) s[j] = std::exp(s[j] - mx);
}

template <class T>
inline void store_kv(T* dst, const float* src, int64_t D) {
  for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
}

template <class T>
void attend_impl(const at::Tensor& qkv, at::Tensor& K, at::Tensor& V, at::Tensor& Ks, at::Tensor& Vs,
                 const at::Tensor& slots, const at::Tensor& lengths, const at::Tensor& cos, const at::Tensor& sin,
                 int64_t H, const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                 double norm_eps, double scale, const c10::optional<at::Tensor>& sinks, at::Tensor& out) {
  const int64_t B = K.size(0), KV = K.size(1), cap = K.size(2), D = K.size(3), NS = Ks.size(2);
  const int64_t* sink_p = sinks ? sinks->data_ptr<int64_t>() : nullptr;  // each row's sink slots (its pin)
  auto sinks_of = [&](int64_t b) { return sink_p ? sink_p[b] : NS; };
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(sinks_of(b) >= 0 && sinks_of(b) <= NS, "sinks out of range");
  const int64_t G = H / KV, rot = cos.size(-1);
  const int64_t stride_qkv = qkv.size(1);
  const float* qkv_p = qkv.data_ptr<float>();
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  const int64_t* len_p = lengths.data_ptr<int64_t>();
  const float *cos_p = cos.data_ptr<float>(), *sin_p = sin.data_ptr<float>();  // [B, 2, rot]
  const float* qn = q_norm ? q_norm->data_ptr<float>() : nullptr;
  const float* kn = k_norm ? k_norm->data_ptr<float>() : nullptr;
  T *Kp = K.data_ptr<T>(), *Vp = V.data_ptr<T>(), *Ksp = Ks.data_ptr<T>(), *Vsp = Vs.data_ptr<T>();

  // queries of both frames [B, H, 2, D] (already scaled); the new keys/values into their slots
  std::vector<float> q(B * H * 2 * D), kbuf(D);
  for (int64_t b = 0; b < B; ++b) {
    const float* row = qkv_p + b * stride_qkv;
    const float *c0 = cos_p + (b * 2) * rot, *s0 = sin_p + (b * 2) * rot;
    const float *c1 = c0 + rot, *s1 = s0 + rot;
    for (int64_t h = 0; h < H; ++h) {
      float* qw = q.data() + ((b * H + h) * 2) * D;
      std::memcpy(qw, row + h * D, D * sizeof(float));
      if (qn) head_norm(qw, qn, D, static_cast<float>(norm_eps));
      float* qs = qw + D;
      std::memcpy(qs, qw, D * sizeof(float));
      rope_head(qw, c0, s0, rot);
      rope_head(qs, c1, s1, rot);
      for (int64_t d = 0; d < D; ++d) { qw[d] *= static_cast<float>(scale); qs[d] *= static_cast<float>(scale); }
    }
    const int64_t slot = slot_p[b];
    TORCH_CHECK(slot >= 0 && slot < cap, "slot out of range");
    for (int64_t h = 0; h < KV; ++h) {
      std::memcpy(kbuf.data(), row + (H + h) * D, D * sizeof(float));
      if (kn) head_norm(kbuf.data(), kn, D, static_cast<float>(norm_eps));
      rope_head(kbuf.data(), c0, s0, rot);
      const float* v = row + (H + KV + h) * D;
      store_kv(Kp + ((b * KV + h) * cap + slot) * D, kbuf.data(), D);
      store_kv(Vp + ((b * KV + h) * cap + slot) * D, v, D);
      if (slot < sinks_of(b)) {  // the token is a sink: kept as computed, never re-rotated
        store_kv(Ksp + ((b * KV + h) * NS + slot) * D, kbuf.data(), D);
        store_kv(Vsp + ((b * KV + h) * NS + slot) * D, v, D);
      }
    }
  }

  // tasks: (row, kv head, chunk of keys); each keeps an unnormalized partial softmax
  constexpr int64_t kChunk = 32;
  int64_t max_len = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(len_p[b] >= 1 && len_p[b] <= cap, "lengths out of range");
    max_len = std::max(max_len, len_p[b]);
  }
  const int64_t chunks = (max_len + kChunk - 1) / kChunk;
  // partial softmax of every task: unnormalized outputs [tasks, G, D], maxima and sums [tasks, G]
  const int64_t tasks = B * KV * chunks;
  std::vector<float> part_out(tasks * G * D, 0.f), part_mx(tasks * G, -std::numeric_limits<float>::infinity()),
      part_sum(tasks * G, 0.f);
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s(kChunk);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / (KV * chunks), h = (t / chunks) % KV, c = t % chunks;
      const int64_t j0 = c * kChunk, j1 = std::min(len_p[b], j0 + kChunk);
      if (j0 >= j1) continue;
      const int64_t n = j1 - j0;
      const T* kh = Kp + (b * KV + h) * cap * D;
      const T* vh = Vp + (b * KV + h) * cap * D;
      const T* ksh = Ksp + (b * KV + h) * NS * D;
      const T* vsh = Vsp + (b * KV + h) * NS * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qw = q.data() + ((b * H + h * G + g) * 2) * D;
        const float* qs = qw + D;
        const int64_t ns = sinks_of(b);
        const int64_t w0 = std::max(j0, std::min(ns, j1));  // the window's slots in this chunk: [w0, j1)
        for (int64_t j = j0; j < w0; ++j) s[j - j0] = dot(qs, ksh + j * D, D);
        scores(qw, kh + w0 * D, j1 - w0, D, s.data() + (w0 - j0));
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) mx = std::max(mx, s[j]);
        exp_shifted(s.data(), n, mx);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) sum += s[j];
        float* og = part_out.data() + (t * G + g) * D;
        weighted_sum(s.data(), j0 < ns ? vsh + j0 * D : vh + j0 * D, std::min(w0, j1) - j0, D, og);
        weighted_sum(s.data() + (w0 - j0), vh + w0 * D, j1 - w0, D, og);
        part_mx[t * G + g] = mx;
        part_sum[t * G + g] = sum;
      }
    }
  });
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < KV; ++h)
      for (int64_t g = 0; g < G; ++g) {
        const int64_t t_first = (b * KV + h) * chunks;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < chunks; ++c) mx = std::max(mx, part_mx[(t_first + c) * G + g]);
        float* o = op + (b * H + h * G + g) * D;
        std::fill(o, o + D, 0.f);
        float total = 0.f;
        for (int64_t c = 0; c < chunks; ++c) {
          const int64_t i = (t_first + c) * G + g;
          if (part_sum[i] == 0.f) continue;  // a chunk past this row's length
          const float w = std::exp(part_mx[i] - mx);
          total += w * part_sum[i];
          for (int64_t d = 0; d < D; ++d) o[d] += w * part_out[i * D + d];
        }
        for (int64_t d = 0; d < D; ++d) o[d] /= total;
      }
}

at::Tensor attend(const at::Tensor& qkv, at::Tensor K, at::Tensor V, at::Tensor Ks, at::Tensor Vs,
                  const at::Tensor& slots, const at::Tensor& lengths, const at::Tensor& cos, const at::Tensor& sin,
                  int64_t H, const c10::optional<at::Tensor>& q_norm, const c10::optional<at::Tensor>& k_norm,
                  double norm_eps, double scale, const c10::optional<at::Tensor>& sinks) {
  TORCH_CHECK(K.dim() == 4 && K.is_contiguous() && V.is_contiguous() && Ks.is_contiguous() && Vs.is_contiguous(),
              "the cache buffers must be contiguous [B, KV, cap, D]");
  TORCH_CHECK(K.sizes() == V.sizes() && Ks.size(2) == Vs.size(2), "keys and values differ in shape");
  TORCH_CHECK(K.scalar_type() == V.scalar_type() && K.scalar_type() == Ks.scalar_type() &&
              K.scalar_type() == Vs.scalar_type(), "the cache buffers differ in dtype");
  const int64_t B = K.size(0), KV = K.size(1), D = K.size(3);
  TORCH_CHECK(H % KV == 0, "query heads must be a multiple of key/value heads");
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(0) == B && qkv.size(1) == (H + 2 * KV) * D &&
              qkv.scalar_type() == at::kFloat && qkv.is_contiguous(), "qkv must be [B, (H + 2 KV) D] float32");
  TORCH_CHECK(slots.numel() == B && lengths.numel() == B && slots.scalar_type() == at::kLong &&
              lengths.scalar_type() == at::kLong, "slots and lengths: one int64 per row");
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == B && cos.size(1) == 2 && cos.size(2) <= D && cos.size(2) % 2 == 0 &&
              cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat,
              "cos/sin must be [B, 2, rot] float32");
  TORCH_CHECK(!sinks || (sinks->numel() == B && sinks->scalar_type() == at::kLong && sinks->is_contiguous()),
              "sinks: one int64 per row");
  auto out = at::empty({B, H * D}, qkv.options());
  switch (K.scalar_type()) {
    case at::kFloat:
      attend_impl<float>(qkv, K, V, Ks, Vs, slots, lengths, cos, sin, H, q_norm, k_norm, norm_eps, scale, sinks, out);
      break;
    case at::kHalf:
      attend_impl<at::Half>(qkv, K, V, Ks, Vs, slots, lengths, cos, sin, H, q_norm, k_norm, norm_eps, scale, sinks, out);
      break;
    case at::kBFloat16:
      attend_impl<at::BFloat16>(qkv, K, V, Ks, Vs, slots, lengths, cos, sin, H, q_norm, k_norm, norm_eps, scale, sinks, out);
      break;
    default:
      TORCH_CHECK(false, "cache dtype must be float32, float16 or bfloat16");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(sinkstream, m) {
  m.def("packed_linear(Tensor x, Tensor w, Tensor? scale, Tensor? bias, Tensor(a!)? acc) -> Tensor");
  m.def("dequantize_tiles(Tensor w, Tensor? scale, int t0, int t1) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("silu_mul(Tensor gu) -> Tensor");
  m.def("attend(Tensor qkv, Tensor(a!) K, Tensor(b!) V, Tensor(c!) Ks, Tensor(d!) Vs, Tensor slots, Tensor lengths, "
        "Tensor cos, Tensor sin, int H, Tensor? q_norm, Tensor? k_norm, float norm_eps, float scale, Tensor? sinks) -> Tensor");
}

TORCH_LIBRARY_IMPL(sinkstream, CPU, m) {
  m.impl("packed_linear", packed_linear);
  m.impl("dequantize_tiles", dequantize_tiles);
  m.impl("rms_norm", rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("attend", attend);
}
