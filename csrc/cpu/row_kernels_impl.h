// Definitions behind row_kernels.h: plain loops for double, explicit 8-lane vectors for float
// (the compiler's vector extensions), compiled for the instruction set of the including file.
// Include only from row_kernels_<isa>.cpp, after defining OPQN_ISA (the namespace of that build).
// Everything here has internal linkage and uses compiler builtins only, so no code built for one
// ISA can be picked by the linker for another.
#ifndef OPQN_ISA
#error "define OPQN_ISA before including row_kernels_impl.h"
#endif

#include <cstdint>
#include <memory>

#include "cpu/row_kernels.h"

namespace opqn::cpu::OPQN_ISA {
namespace {

template <typename T>
constexpr T kEps = T(1e-12);

// ---- float vectors: 8 lanes, one AVX2 register in the avx2 build, two SSE registers otherwise ----
typedef float VecF __attribute__((vector_size(32)));
typedef int32_t VecI __attribute__((vector_size(32)));
constexpr int64_t kW = 8;

inline VecF splat(float s) { return VecF{} + s; }
inline VecF load(const float* p) {
  VecF v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, VecF v) { __builtin_memcpy(p, &v, sizeof v); }
// The first n < kW lanes from p, the others `fill`: tails run through the same vector code.
inline VecF load_n(const float* p, int64_t n, float fill) {
  VecF v = splat(fill);
  __builtin_memcpy(&v, p, n * sizeof(float));
  return v;
}
inline void store_n(float* p, VecF v, int64_t n) { __builtin_memcpy(p, &v, n * sizeof(float)); }
inline VecF select(VecI mask, VecF a, VecF b) {
  return reinterpret_cast<VecF>((reinterpret_cast<VecI>(a) & mask) | (reinterpret_cast<VecI>(b) & ~mask));
}
inline float hsum(VecF v) {
  float s = 0.0f;
  for (int64_t i = 0; i < kW; ++i) s += v[i];
  return s;
}
inline float hmax(VecF v) {
  float m = v[0];
  for (int64_t i = 1; i < kW; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// Runs body(k, v) over a row of n floats in vectors, the tail padded with `fill`; body returns
// the vector to store back.
template <typename Body>
inline void for_vectors(float* row, int64_t n, float fill, Body&& body) {
  int64_t k = 0;
  for (; k + kW <= n; k += kW) store(row + k, body(k, load(row + k)));
  if (k < n) store_n(row + k, body(k, load_n(row + k, n - k, fill)), n - k);
}

// exp(x) for x <= 0 to ~1 ulp (Cephes polynomial); NaN stays NaN; 0 below log(FLT_MIN).
inline VecF exp_nonpositive(VecF x) {
  const VecI underflows = x < -87.33654f;
  // the polynomial of a clamped x: a far more negative one would overflow the integer exponent
  // arithmetic below (its result is replaced by 0 anyway); NaN compares false and stays
  const VecF xc = select(x < -88.0f, splat(-88.0f), x);
  const VecF shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const VecF t = xc * 1.44269504088896341f + shifter;
  const VecF n = t - shifter;
  const VecI ni = reinterpret_cast<VecI>(t) - reinterpret_cast<VecI>(shifter);
  const VecF r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  VecF p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VecF y = p * reinterpret_cast<VecF>((ni + 127) << 23);
  return select(underflows, splat(0.0f), y);
}

// log(x) for normal x > 0 to ~1 ulp (Cephes polynomial).
inline VecF log_positive(VecF x) {
  const VecI bits = reinterpret_cast<VecI>(x);
  const VecF e0 = __builtin_convertvector(((bits >> 23) & 0xFF) - 127, VecF);
  const VecF m0 = reinterpret_cast<VecF>((bits & 0x007FFFFF) | 0x3F800000);  // [1, 2)
  const VecI big = m0 > 1.41421356f;
  const VecF f = select(big, m0 * 0.5f, m0) - 1.0f;
  const VecF e = select(big, e0 + 1.0f, e0);
  const VecF z = f * f;
  VecF y = splat(7.0376836292e-2f);
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return f + y + 0.693359375f * e;
}

// ---- generic rows: the double build (float has the vector specializations below) ----
inline double sqrt_of(double x) { return __builtin_sqrt(x); }
inline float sqrt_of(float x) { return __builtin_sqrtf(x); }

template <typename T>
T sum_squares(const T* x, int64_t n) {
  T s = 0;
  for (int64_t k = 0; k < n; ++k) s += x[k] * x[k];
  return s;
}

template <typename T>
T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t k = 0; k < n; ++k) s += a[k] * b[k];
  return s;
}

template <typename T>
T row_scale(T scale, const T* norms, int64_t r) {
  if (norms == nullptr) return scale;
  return scale / (norms[r] > kEps<T> ? norms[r] : kEps<T>);
}

template <typename T>
void row_norms(const T* x, int64_t rows, int64_t d, T* norms) {
  for (int64_t r = 0; r < rows; ++r) norms[r] = sqrt_of(sum_squares(x + r * d, d));
}

template <typename T>
void softmax_entropy_rows(T* logits, int64_t rows, int64_t K, T scale, const T* norms, T* entropy) {
  for (int64_t r = 0; r < rows; ++r) {
    T* l = logits + r * K;
    const T sr = row_scale(scale, norms, r);
    T mx = -__builtin_inf();
    for (int64_t k = 0; k < K; ++k) {
      l[k] *= sr;
      mx = l[k] > mx ? l[k] : mx;
    }
    // z = sum exp(l - mx), s = sum exp(l - mx) (l - mx); H = log z - s / z
    T z = 0, s = 0;
    for (int64_t k = 0; k < K; ++k) {
      const T v = l[k] - mx;
      const T e = __builtin_exp(v);
      l[k] = e;
      z += e;
      s += e > T(0) ? e * v : T(0);
    }
    const T inv = T(1) / z;
    for (int64_t k = 0; k < K; ++k) l[k] *= inv;
    entropy[r] = __builtin_log(z) - s * inv;
  }
}

template <typename T>
void softmax_backward_rows(const T* probs, const T* grad_entropy, T* g, int64_t rows, int64_t K,
                           T scale, const T* norms) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = probs + r * K;
    T* gr = g + r * K;
    const T gh = grad_entropy != nullptr ? grad_entropy[r] : T(0);
    if (gh != T(0)) {
      // dH/dp_k = -(log p_k + 1); the constant cancels in the softmax backward.
      for (int64_t k = 0; k < K; ++k) gr[k] -= gh * (p[k] > T(0) ? __builtin_log(p[k]) : T(0));
    }
    const T pg = dot(p, gr, K);
    const T sr = row_scale(scale, norms, r);
    for (int64_t k = 0; k < K; ++k) gr[k] = sr * p[k] * (gr[k] - pg);
  }
}

template <typename T>
void normalize_backward_rows(const T* x, const T* norms, T* g, int64_t rows, int64_t d) {
  // With xhat = x / n: dL/dx = g - xhat (xhat . g) where the clamp is inactive (n >= eps).
  for (int64_t r = 0; r < rows; ++r) {
    const T n = norms[r];
    if (!(n >= kEps<T>)) continue;
    const T* xr = x + r * d;
    T* gr = g + r * d;
    const T c = dot(xr, gr, d) / (n * n);
    for (int64_t j = 0; j < d; ++j) gr[j] -= xr[j] * c;
  }
}

template <typename T>
void row_products(const T* x, const T* A, int64_t rows, int64_t M, int64_t d, int64_t K, T* logits) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * d;
    const T* a = A + (r % M) * d * K;
    T* l = logits + r * K;
    for (int64_t k = 0; k < K; ++k) l[k] = T(0);
    for (int64_t j = 0; j < d; ++j) {
      const T xj = xr[j];
      for (int64_t k = 0; k < K; ++k) l[k] += xj * a[j * K + k];
    }
  }
}

template <typename T>
void row_reconstructions(const T* probs, const T* C, int64_t rows, int64_t M, int64_t d, int64_t K, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* c = C + (r % M) * d * K;
    for (int64_t j = 0; j < d; ++j) out[r * d + j] = dot(c + j * K, probs + r * K, K);
  }
}

// ---- float rows in vectors ----
template <>
float dot<float>(const float* a, const float* b, int64_t n) {
  VecF a0 = splat(0.0f), a1 = splat(0.0f);
  int64_t k = 0;
  for (; k + 2 * kW <= n; k += 2 * kW) {
    a0 += load(a + k) * load(b + k);
    a1 += load(a + k + kW) * load(b + k + kW);
  }
  for (; k + kW <= n; k += kW) a0 += load(a + k) * load(b + k);
  if (k < n) a1 += load_n(a + k, n - k, 0.0f) * load_n(b + k, n - k, 0.0f);
  return hsum(a0 + a1);
}

template <>
float sum_squares<float>(const float* x, int64_t n) {
  return dot(x, x, n);
}

template <>
void softmax_entropy_rows<float>(float* logits, int64_t rows, int64_t K, float scale,
                                 const float* norms, float* entropy) {
  const float neg_inf = -__builtin_inff();
  for (int64_t r = 0; r < rows; ++r) {
    float* l = logits + r * K;
    const float sr = row_scale(scale, norms, r);
    VecF vmx = splat(neg_inf);
    for_vectors(l, K, neg_inf, [&](int64_t, VecF v) {
      v *= sr;
      vmx = select(v > vmx, v, vmx);
      return v;
    });
    const VecF mx = splat(hmax(vmx));
    // z = sum exp(l - mx), s = sum exp(l - mx) (l - mx); H = log z - s / z. Padding lanes hold
    // -inf, whose exp is 0 and adds nothing.
    VecF vz = splat(0.0f), vs = splat(0.0f);
    for_vectors(l, K, neg_inf, [&](int64_t, VecF v) {
      v -= mx;
      const VecF e = exp_nonpositive(v);
      vz += e;
      vs += select(e > 0.0f, e * v, splat(0.0f));
      return e;
    });
    const float z = hsum(vz), inv = 1.0f / z;
    for_vectors(l, K, 0.0f, [&](int64_t, VecF e) { return e * inv; });
    entropy[r] = __builtin_logf(z) - hsum(vs) * inv;
  }
}

template <>
void softmax_backward_rows<float>(const float* probs, const float* grad_entropy, float* g,
                                  int64_t rows, int64_t K, float scale, const float* norms) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = probs + r * K;
    float* gr = g + r * K;
    const float gh = grad_entropy != nullptr ? grad_entropy[r] : 0.0f;
    const auto p_at = [&](int64_t k) { return k + kW <= K ? load(p + k) : load_n(p + k, K - k, 0.0f); };
    if (gh != 0.0f) {
      // dH/dp_k = -(log p_k + 1); the constant cancels in the softmax backward.
      for_vectors(gr, K, 0.0f, [&](int64_t k, VecF v) {
        const VecF pk = p_at(k);
        return v - gh * select(pk > 0.0f, log_positive(pk), splat(0.0f));
      });
    }
    const float pg = dot(p, gr, K);
    const float sr = row_scale(scale, norms, r);
    for_vectors(gr, K, 0.0f, [&](int64_t k, VecF v) { return sr * p_at(k) * (v - pg); });
  }
}

// The lanes' sum as a tree of three adds (hsum's chain of seven costs more than a short dot).
inline float hsum_tree(VecF v) {
  typedef float Vec4 __attribute__((vector_size(16)));
  Vec4 s = __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
  s += __builtin_shufflevector(s, s, 2, 3, 0, 1);
  s += __builtin_shufflevector(s, s, 1, 0, 3, 2);
  return s[0];
}

// logits[k0, k0 + NV * kW) of one row: NV independent accumulators over all of d, so that the
// multiply-adds of consecutive j do not wait on each other.
template <int NV>
inline void products_block(const float* xr, const float* a, int64_t d, int64_t K, int64_t k0, float* l) {
  VecF acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = splat(0.0f);
  for (int64_t j = 0; j < d; ++j) {
    const VecF xj = splat(xr[j]);
    const float* aj = a + j * K + k0;
    for (int v = 0; v < NV; ++v) acc[v] += xj * load(aj + v * kW);
  }
  for (int v = 0; v < NV; ++v) store(l + k0 + v * kW, acc[v]);
}

template <>
void row_products<float>(const float* x, const float* A, int64_t rows, int64_t M, int64_t d, int64_t K,
                         float* logits) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    const float* a = A + (r % M) * d * K;
    float* l = logits + r * K;
    int64_t k = 0;
    for (; K - k >= 8 * kW; k += 8 * kW) products_block<8>(xr, a, d, K, k, l);
    if (K - k >= 4 * kW) products_block<4>(xr, a, d, K, k, l), k += 4 * kW;
    if (K - k >= 2 * kW) products_block<2>(xr, a, d, K, k, l), k += 2 * kW;
    if (K - k >= kW) products_block<1>(xr, a, d, K, k, l), k += kW;
    if (k < K) {  // the last K % kW columns
      VecF acc = splat(0.0f);
      for (int64_t j = 0; j < d; ++j) acc += xr[j] * load_n(a + j * K + k, K - k, 0.0f);
      store_n(l + k, acc, K - k);
    }
  }
}

// out[j] of one row for NJ consecutive j: dot products of rows of C with p, NJ at a time so that
// their multiply-adds are independent, each summed across lanes at the end.
template <int NJ>
inline void reconstructions_block(const float* c, const float* p, int64_t K, int64_t j0, float* out) {
  VecF acc[NJ];
  for (int i = 0; i < NJ; ++i) acc[i] = splat(0.0f);
  int64_t k = 0;
  for (; k + kW <= K; k += kW) {
    const VecF pk = load(p + k);
    for (int i = 0; i < NJ; ++i) acc[i] += load(c + (j0 + i) * K + k) * pk;
  }
  if (k < K) {
    const VecF pk = load_n(p + k, K - k, 0.0f);
    for (int i = 0; i < NJ; ++i) acc[i] += load_n(c + (j0 + i) * K + k, K - k, 0.0f) * pk;
  }
  for (int i = 0; i < NJ; ++i) out[j0 + i] = hsum_tree(acc[i]);
}

template <>
void row_reconstructions<float>(const float* probs, const float* C, int64_t rows, int64_t M, int64_t d, int64_t K,
                                float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = C + (r % M) * d * K;
    const float* p = probs + r * K;
    float* o = out + r * d;
    int64_t j = 0;
    for (; j + 4 <= d; j += 4) reconstructions_block<4>(c, p, K, j, o);
    for (; j < d; ++j) reconstructions_block<1>(c, p, K, j, o);
  }
}

#include "cpu/peaked_rows_impl.h"

template <typename T>
constexpr RowKernels<T> kernel_set() {
  return {&row_norms<T>, &softmax_entropy_rows<T>, &softmax_backward_rows<T>, &normalize_backward_rows<T>,
          &row_products<T>, &row_reconstructions<T>, &count_kept<T>, &peaked_reconstructions<T>,
          &peaked_backward_rows<T>, &peaked_weight_grad<T>, &transpose_rows<T>};
}

}  // namespace

extern const RowKernels<float> kRowKernelsFloat = kernel_set<float>();
extern const RowKernels<double> kRowKernelsDouble = kernel_set<double>();

}  // namespace opqn::cpu::OPQN_ISA
