// Definitions behind row_kernels.h: plain loops for double, explicit 8-lane vectors for float
// (the compiler's vector extensions), compiled for the instruction set of the including file.
// Include only from row_kernels_<isa>.cpp, after defining OPQN_ISA (the namespace of that build). Everything here has internal linkage and uses compiler
// builtins only, so no code built for one ISA can be picked by the linker for another.
#ifndef OPQN_ISA
#error "define OPQN_ISA before including row_kernels_impl.h"
#endif

#include <cstdint>

#include "cpu/row_kernels.h"

// The vector helpers are internal and inlined: their ABI across builds does not matter.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace opqn::cpu::OPQN_ISA {
namespace {

template <typename T>
constexpr T kEps = T(1e-12);

inline uint32_t float_bits(float x) {
  uint32_t u;
  __builtin_memcpy(&u, &x, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float x;
  __builtin_memcpy(&x, &u, sizeof x);
  return x;
}

// exp(x) for x <= 0 to ~1 ulp (Cephes polynomial); NaN stays NaN; 0 below log(FLT_MIN).
inline float exp_nonpositive(float x) {
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const int32_t ni = static_cast<int32_t>(float_bits(t) - float_bits(shifter));
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float y = p * bits_float(static_cast<uint32_t>(ni + 127) << 23);
  return x < -87.33654f ? 0.0f : y;
}

inline double exp_nonpositive(double x) { return __builtin_exp(x); }

// log(x) for normal x > 0 to ~1 ulp (Cephes polynomial).
inline float log_positive(float x) {
  const uint32_t bits = float_bits(x);
  const float e0 = static_cast<float>(static_cast<int32_t>(bits >> 23) - 127);
  const float m0 = bits_float((bits & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  const bool big = m0 > 1.41421356f;
  const float f = (big ? m0 * 0.5f : m0) - 1.0f;
  const float e = big ? e0 + 1.0f : e0;
  const float z = f * f;
  float y = 7.0376836292e-2f;
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

inline double log_positive(double x) { return __builtin_log(x); }

inline float sqrt_of(float x) { return __builtin_sqrtf(x); }
inline double sqrt_of(double x) { return __builtin_sqrt(x); }

// Explicit SIMD for float through the compiler's vector extensions: 8 lanes, lowered to one
// AVX2 register in the avx2 build and to two SSE registers in the baseline build.
typedef float VecF __attribute__((vector_size(32)));
typedef int32_t VecI __attribute__((vector_size(32)));
constexpr int64_t kW = 8;

inline VecF load(const float* p) {
  VecF v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
inline void store(float* p, VecF v) { __builtin_memcpy(p, &v, sizeof v); }
inline VecF splat(float s) { return VecF{} + s; }
inline VecF select(VecI mask, VecF a, VecF b) {
  return reinterpret_cast<VecF>((reinterpret_cast<VecI>(a) & mask) | (reinterpret_cast<VecI>(b) & ~mask));
}
inline VecF vmax(VecF a, VecF b) { return select(a > b, a, b); }
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

// exp_nonpositive and log_positive above, eight lanes at a time.
inline VecF exp_nonpositive(VecF x) {
  const VecF shifter = splat(12582912.0f);
  const VecF t = x * 1.44269504088896341f + shifter;
  const VecF n = t - shifter;
  const VecI ni = reinterpret_cast<VecI>(t) - reinterpret_cast<VecI>(shifter);
  const VecF r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  VecF p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const VecF y = p * reinterpret_cast<VecF>((ni + 127) << 23);
  return select(x < -87.33654f, splat(0.0f), y);
}

inline VecF log_positive(VecF x) {
  const VecI bits = reinterpret_cast<VecI>(x);
  const VecF e0 = __builtin_convertvector(((bits >> 23) & 0xFF) - 127, VecF);
  const VecF m0 = reinterpret_cast<VecF>((bits & 0x007FFFFF) | 0x3F800000);
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
      const T e = exp_nonpositive(v);
      l[k] = e;
      z += e;
      s += e > T(0) ? e * v : T(0);
    }
    const T inv = T(1) / z;
    for (int64_t k = 0; k < K; ++k) l[k] *= inv;
    entropy[r] = log_positive(z) - s * inv;
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
      for (int64_t k = 0; k < K; ++k) gr[k] -= gh * (p[k] > T(0) ? log_positive(p[k]) : T(0));
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

template <>
float sum_squares<float>(const float* x, int64_t n) {
  VecF a0 = splat(0.0f), a1 = splat(0.0f);
  int64_t k = 0;
  for (; k + 2 * kW <= n; k += 2 * kW) {
    const VecF v0 = load(x + k), v1 = load(x + k + kW);
    a0 += v0 * v0;
    a1 += v1 * v1;
  }
  for (; k + kW <= n; k += kW) {
    const VecF v = load(x + k);
    a0 += v * v;
  }
  float s = hsum(a0 + a1);
  for (; k < n; ++k) s += x[k] * x[k];
  return s;
}

template <>
float dot<float>(const float* a, const float* b, int64_t n) {
  VecF a0 = splat(0.0f), a1 = splat(0.0f);
  int64_t k = 0;
  for (; k + 2 * kW <= n; k += 2 * kW) {
    a0 += load(a + k) * load(b + k);
    a1 += load(a + k + kW) * load(b + k + kW);
  }
  for (; k + kW <= n; k += kW) a0 += load(a + k) * load(b + k);
  float s = hsum(a0 + a1);
  for (; k < n; ++k) s += a[k] * b[k];
  return s;
}

template <>
void softmax_entropy_rows<float>(float* logits, int64_t rows, int64_t K, float scale,
                                 const float* norms, float* entropy) {
  for (int64_t r = 0; r < rows; ++r) {
    float* l = logits + r * K;
    const float sr = row_scale(scale, norms, r);
    VecF vmx = splat(-__builtin_inff());
    int64_t k = 0;
    for (; k + kW <= K; k += kW) {
      const VecF v = load(l + k) * sr;
      store(l + k, v);
      vmx = vmax(v, vmx);
    }
    float mx = hmax(vmx);
    for (; k < K; ++k) {
      l[k] *= sr;
      mx = l[k] > mx ? l[k] : mx;
    }
    // z = sum exp(l - mx), s = sum exp(l - mx) (l - mx); H = log z - s / z
    VecF vz = splat(0.0f), vs = splat(0.0f);
    const VecF vm = splat(mx);
    for (k = 0; k + kW <= K; k += kW) {
      const VecF v = load(l + k) - vm;
      const VecF e = exp_nonpositive(v);
      store(l + k, e);
      vz += e;
      vs += select(e > 0.0f, e * v, splat(0.0f));
    }
    float z = hsum(vz), s = hsum(vs);
    for (; k < K; ++k) {
      const float v = l[k] - mx;
      const float e = exp_nonpositive(v);
      l[k] = e;
      z += e;
      s += e > 0.0f ? e * v : 0.0f;
    }
    const float inv = 1.0f / z;
    for (k = 0; k + kW <= K; k += kW) store(l + k, load(l + k) * inv);
    for (; k < K; ++k) l[k] *= inv;
    entropy[r] = log_positive(z) - s * inv;
  }
}

template <>
void softmax_backward_rows<float>(const float* probs, const float* grad_entropy, float* g,
                                  int64_t rows, int64_t K, float scale, const float* norms) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* p = probs + r * K;
    float* gr = g + r * K;
    const float gh = grad_entropy != nullptr ? grad_entropy[r] : 0.0f;
    int64_t k = 0;
    if (gh != 0.0f) {
      // dH/dp_k = -(log p_k + 1); the constant cancels in the softmax backward.
      for (; k + kW <= K; k += kW) {
        const VecF pk = load(p + k);
        const VecF lp = select(pk > 0.0f, log_positive(pk), splat(0.0f));
        store(gr + k, load(gr + k) - gh * lp);
      }
      for (; k < K; ++k) gr[k] -= gh * (p[k] > 0.0f ? log_positive(p[k]) : 0.0f);
    }
    const float pg = dot(p, gr, K);
    const float sr = row_scale(scale, norms, r);
    for (k = 0; k + kW <= K; k += kW) store(gr + k, sr * load(p + k) * (load(gr + k) - pg));
    for (; k < K; ++k) gr[k] = sr * p[k] * (gr[k] - pg);
  }
}

template <typename T>
constexpr RowKernels<T> kernel_set() {
  return {&row_norms<T>, &softmax_entropy_rows<T>, &softmax_backward_rows<T>,
          &normalize_backward_rows<T>};
}

}  // namespace

extern const RowKernels<float> kRowKernelsFloat = kernel_set<float>();
extern const RowKernels<double> kRowKernelsDouble = kernel_set<double>();

}  // namespace opqn::cpu::OPQN_ISA
