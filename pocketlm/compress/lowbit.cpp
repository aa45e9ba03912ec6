// Weight-only int8 and int4 matmuls for the few rows of decoding, on AVX-512 VNNI: y[M, N] = x[M, K] W^T.
//
// As llama.cpp does, each row of x is quantized to int8 per block of 32 columns (a float scale each), so one
// `vpdpbusd` multiplies 64 weight bytes by 4 activation bytes for 16 output rows at once. The weights are
// kept unsigned in a layout made once (`int8_layout`, `int4_layout`): blocks of 16 output rows, and within a
// block, 4 consecutive columns of each of the 16 rows side by side (64 bytes). Per group of columns the int32
// sums are scaled to float: sum_k w x = s_w s_x (sum_k u xq - offset sum_k xq) (+ z s_x sum_k xq for int4 asym).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VNNI__)
#error "pocketlm's low-bit kernels need AVX-512 VNNI"
#endif

namespace {

constexpr int64_t QB = 32;  // columns per activation scale
constexpr int MB = 4;       // rows of x sharing one pass over the weights (their accumulators in registers)

// x [M, K] fp32 -> xq int8 [M, K], per 32 columns: scale sx (float) and the sum of the codes (int32).
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* sx, int32_t* xs) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < K / QB; ++b) {
      const float* xb = x + m * K + b * QB;
      __m512 a0 = _mm512_loadu_ps(xb), a1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)));
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      const __m512 vi = _mm512_set1_ps(inv);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(a0, vi)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(a1, vi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + b * QB), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + m * K + b * QB + 16), _mm512_cvtsepi32_epi8(q1));
      sx[m * (K / QB) + b] = scale;
      xs[m * (K / QB) + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

inline __m512i bcast4(const int8_t* p) { int32_t v; std::memcpy(&v, p, 4); return _mm512_set1_epi32(v); }

// One block of 16 weight rows against R rows of x. int8: w = (u - 128) s, 64 bytes per 4 columns.
// int4: 64 bytes hold 8 columns (low nibbles: columns c..c+3 of a 32-column group's first half, high nibbles:
// the same of its second half); w = (u - 8) s + z.
template <int R, bool INT4>
void block16(const uint8_t* w, const float* s, const float* z, const int8_t* xq, const float* sx,
             const int32_t* xs, float* y, int64_t N, int64_t K, int64_t G, int64_t n) {
  const int64_t groups = K / G;
  __m512 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(15);
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 sw = _mm512_loadu_ps(s + g * 16);
    const __m512 zw = z ? _mm512_loadu_ps(z + g * 16) : _mm512_setzero_ps();
    for (int64_t b = g * G; b < (g + 1) * G; b += QB) {  // one activation block
      __m512i dot[R];
      for (int i = 0; i < R; ++i) dot[i] = _mm512_setzero_si512();
      if constexpr (INT4) {
        const uint8_t* wb = w + b * 8;  // 16 rows x 32 columns / 2
        for (int c = 0; c < 4; ++c) {
          const __m512i v = _mm512_loadu_si512(wb + c * 64);
          const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          for (int i = 0; i < R; ++i) {
            const int8_t* xb = xq + i * K + b;
            dot[i] = _mm512_dpbusd_epi32(dot[i], lo, bcast4(xb + c * 4));
            dot[i] = _mm512_dpbusd_epi32(dot[i], hi, bcast4(xb + 16 + c * 4));
          }
        }
      } else {
        const uint8_t* wb = w + b * 16;  // 16 rows x 32 columns
        for (int c = 0; c < 8; ++c) {
          const __m512i v = _mm512_loadu_si512(wb + c * 64);
          for (int i = 0; i < R; ++i) dot[i] = _mm512_dpbusd_epi32(dot[i], v, bcast4(xq + i * K + b + c * 4));
        }
      }
      const int64_t qb = b / QB;
      for (int i = 0; i < R; ++i) {
        const int32_t sum = xs[i * (K / QB) + qb];
        const __m512i centred = _mm512_sub_epi32(dot[i], _mm512_set1_epi32(sum * (INT4 ? 8 : 128)));
        const __m512 sxi = _mm512_set1_ps(sx[i * (K / QB) + qb]);
        acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(centred), sxi), sw, acc[i]);
        if (z) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(sum * sx[i * (K / QB) + qb]), zw, acc[i]);
      }
    }
  }
  const int64_t left = std::min<int64_t>(16, N - n);
  const __mmask16 mask = left == 16 ? 0xFFFF : static_cast<__mmask16>((1u << left) - 1);
  for (int i = 0; i < R; ++i) _mm512_mask_storeu_ps(y + i * N + n, mask, acc[i]);
}

template <bool INT4>
at::Tensor lowbit_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s,
                     const c10::optional<at::Tensor>& z, int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "lowbit_mm: x must be float32 [M, K]");
  TORCH_CHECK(w.scalar_type() == at::kByte && s.scalar_type() == at::kFloat, "lowbit_mm: w uint8, s float32");
  const int64_t M = x.size(0), K = x.size(1), blocks = (N + 15) / 16;
  TORCH_CHECK(K % QB == 0 && s.dim() == 3 && s.size(0) == blocks && s.size(2) == 16 && K % s.size(1) == 0,
              "lowbit_mm: s must be [ceil(N/16), K/G, 16] and K a multiple of 32");
  const int64_t G = K / s.size(1);
  TORCH_CHECK(G % QB == 0 && w.numel() == blocks * 16 * K / (INT4 ? 2 : 1), "lowbit_mm: w has the wrong size");
  at::Tensor zc = z.has_value() ? z->contiguous() : at::Tensor();
  TORCH_CHECK(!zc.defined() || (INT4 && zc.sizes() == s.sizes() && zc.scalar_type() == at::kFloat),
              "lowbit_mm: z must match s");
  auto xc = x.contiguous(), wc = w.contiguous(), sc = s.contiguous();
  std::vector<int8_t> xq(M * K);
  std::vector<float> sx(M * (K / QB));
  std::vector<int32_t> xs(M * (K / QB));
  quantize_rows(xc.data_ptr<float>(), M, K, xq.data(), sx.data(), xs.data());
  auto y = at::empty({M, N}, x.options());
  const uint8_t* wp = wc.data_ptr<uint8_t>();
  const float* sp = sc.data_ptr<float>();
  const float* zp = zc.defined() ? zc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t wblock = 16 * K / (INT4 ? 2 : 1), sblock = 16 * (K / G);
  const int64_t grain = std::max<int64_t>(1, 2048 / K);  // blocks of 16 rows per task: ~32K weights at least
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb)
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t r = std::min<int64_t>(MB, M - m0);
        const uint8_t* wn = wp + nb * wblock;
        const float* sn = sp + nb * sblock;
        const float* zn = zp ? zp + nb * sblock : nullptr;
        const int8_t* xm = xq.data() + m0 * K;
        const float* sxm = sx.data() + m0 * (K / QB);
        const int32_t* xsm = xs.data() + m0 * (K / QB);
        float* ym = yp + m0 * N;
        switch (r) {
          case 1: block16<1, INT4>(wn, sn, zn, xm, sxm, xsm, ym, N, K, G, nb * 16); break;
          case 2: block16<2, INT4>(wn, sn, zn, xm, sxm, xsm, ym, N, K, G, nb * 16); break;
          case 3: block16<3, INT4>(wn, sn, zn, xm, sxm, xsm, ym, N, K, G, nb * 16); break;
          default: block16<4, INT4>(wn, sn, zn, xm, sxm, xsm, ym, N, K, G, nb * 16); break;
        }
      }
  });
  return y;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, int64_t n) {
  return lowbit_mm<false>(x, w, s, c10::nullopt, n);
}
at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& s, const c10::optional<at::Tensor>& z,
                   int64_t n) {
  return lowbit_mm<true>(x, w, s, z, n);
}

}  // namespace

TORCH_LIBRARY(pocketlm_lowbit, m) {
  m.def("int8_mm(Tensor x, Tensor w, Tensor s, int n) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor w, Tensor s, Tensor? z, int n) -> Tensor");
}
TORCH_LIBRARY_IMPL(pocketlm_lowbit, CPU, m) {
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
}
