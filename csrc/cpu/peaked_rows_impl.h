// The row kernels of peaked assignments (row_kernels.h, "Peaked rows"): products that visit only
// the words a row keeps (p >= the floor, or NaN), from transposed weights whose word k is a
// contiguous row of d. Each row first lists its kept words without branches (a branch per word
// would mispredict at every kept one), then works through the list. Part of row_kernels_impl.h
// (included at its end, in the same ISA namespace).

inline double log_of(double x) { return __builtin_log(x); }
inline float log_of(float x) { return __builtin_logf(x); }

// A word is kept unless its probability is below the floor; NaN is kept, so that it propagates.
template <typename T>
inline bool kept(T p, T floor) {
  return !(p < floor);
}

// words[0, n) = the kept k of p[0, K), in increasing order; returns n. Writes only below K.
template <typename T>
inline int64_t list_kept(const T* p, int64_t K, T floor, int32_t* words) {
  int64_t n = 0;
  for (int64_t k = 0; k < K; ++k) {
    words[n] = static_cast<int32_t>(k);
    n += kept(p[k], floor);
  }
  return n;
}

// kCompressedLanes.of[bits] = the numbers of the set bits of bits, lowest first (the rest 0).
struct CompressedLanes {
  int32_t of[256][kW];
};
constexpr CompressedLanes compressed_lanes() {
  CompressedLanes t{};
  for (int bits = 0; bits < 256; ++bits) {
    int n = 0;
    for (int lane = 0; lane < kW; ++lane) {
      if (bits & (1 << lane)) t.of[bits][n++] = lane;
    }
  }
  return t;
}
constexpr CompressedLanes kCompressedLanes = compressed_lanes();

// The lanes of a comparison's mask (-1 or 0 each) as the bits of an integer.
inline unsigned mask_bits(VecI mask) {
  const VecI bit = mask & VecI{1, 2, 4, 8, 16, 32, 64, 128};
  typedef int32_t Vec4I __attribute__((vector_size(16)));
  Vec4I s = __builtin_shufflevector(bit, bit, 0, 1, 2, 3) | __builtin_shufflevector(bit, bit, 4, 5, 6, 7);
  s |= __builtin_shufflevector(s, s, 2, 3, 0, 1);
  s |= __builtin_shufflevector(s, s, 1, 0, 3, 2);
  return static_cast<unsigned>(s[0]);
}

// Eight words at a time: each vector's kept lanes stored compressed at words + n, without branches.
template <>
inline int64_t list_kept<float>(const float* p, int64_t K, float floor, int32_t* words) {
  const VecF vfloor = splat(floor);
  int64_t n = 0, k = 0;
  for (; k + kW <= K; k += kW) {
    const unsigned bits = mask_bits(~(load(p + k) < vfloor));
    VecI lanes;
    __builtin_memcpy(&lanes, kCompressedLanes.of[bits], sizeof lanes);
    lanes += static_cast<int32_t>(k);
    __builtin_memcpy(words + n, &lanes, sizeof lanes);  // n <= k: within words[0, K)
    n += __builtin_popcount(bits);
  }
  for (; k < K; ++k) {
    words[n] = static_cast<int32_t>(k);
    n += kept(p[k], floor);
  }
  return n;
}

// out[0, d) = sum_i w[i] * rows[words[i] * d + (0, d)]
template <typename T>
void combine_rows(const T* rows, const int32_t* words, const T* w, int64_t n, int64_t d, T* out) {
  for (int64_t j = 0; j < d; ++j) out[j] = T(0);
  for (int64_t i = 0; i < n; ++i) {
    const T* row = rows + int64_t(words[i]) * d;
    for (int64_t j = 0; j < d; ++j) out[j] += w[i] * row[j];
  }
}

// Columns [j, j + NV * kW) of combine_rows, in registers over all the words.
template <int NV>
inline void combine_block(const float* rows, const int32_t* words, const float* w, int64_t n, int64_t d,
                          int64_t j, float* out) {
  VecF acc[NV];
  for (int v = 0; v < NV; ++v) acc[v] = splat(0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const float* row = rows + int64_t(words[i]) * d + j;
    const VecF wi = splat(w[i]);
    for (int v = 0; v < NV; ++v) acc[v] += wi * load(row + v * kW);
  }
  for (int v = 0; v < NV; ++v) store(out + j + v * kW, acc[v]);
}

template <>
void combine_rows<float>(const float* rows, const int32_t* words, const float* w, int64_t n, int64_t d,
                         float* out) {
  int64_t j = 0;
  for (; d - j >= 4 * kW; j += 4 * kW) combine_block<4>(rows, words, w, n, d, j, out);
  for (; d - j >= kW; j += kW) combine_block<1>(rows, words, w, n, d, j, out);
  if (j < d) {
    VecF acc = splat(0.0f);
    for (int64_t i = 0; i < n; ++i) acc += w[i] * load_n(rows + int64_t(words[i]) * d + j, d - j, 0.0f);
    store_n(out + j, acc, d - j);
  }
}

// u[i] += rows[words[i] * d + (0, d)] . v[0, d) for i < n
template <typename T>
void add_row_dots(const T* rows, const int32_t* words, int64_t n, const T* v, int64_t d, T* u) {
  for (int64_t i = 0; i < n; ++i) u[i] += dot(rows + int64_t(words[i]) * d, v, d);
}

// Four of add_row_dots' dot products at once, so that their multiply-adds are independent.
inline void row_dots4(const float* rows, const int32_t* words, const float* v, int64_t d, float* u) {
  const float* r[4];
  for (int i = 0; i < 4; ++i) r[i] = rows + int64_t(words[i]) * d;
  VecF acc[4] = {splat(0.0f), splat(0.0f), splat(0.0f), splat(0.0f)};
  int64_t j = 0;
  for (; j + kW <= d; j += kW) {
    const VecF vj = load(v + j);
    for (int i = 0; i < 4; ++i) acc[i] += load(r[i] + j) * vj;
  }
  if (j < d) {
    const VecF vj = load_n(v + j, d - j, 0.0f);
    for (int i = 0; i < 4; ++i) acc[i] += load_n(r[i] + j, d - j, 0.0f) * vj;
  }
  for (int i = 0; i < 4; ++i) u[i] += hsum_tree(acc[i]);
}

template <>
void add_row_dots<float>(const float* rows, const int32_t* words, int64_t n, const float* v, int64_t d,
                         float* u) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) row_dots4(rows, words + i, v, d, u + i);
  for (; i < n; ++i) u[i] += dot(rows + int64_t(words[i]) * d, v, d);
}

// y[0, n) += a * x[0, n)
template <typename T>
inline void axpy(T* y, T a, const T* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

template <>
inline void axpy<float>(float* y, float a, const float* x, int64_t n) {
  const VecF va = splat(a);
  for_vectors(y, n, 0.0f, [&](int64_t j, VecF v) {
    return v + va * (j + kW <= n ? load(x + j) : load_n(x + j, n - j, 0.0f));
  });
}

template <typename T>
int64_t count_kept(const T* probs, int64_t n, T floor) {
  int64_t count = 0;
  for (int64_t k = 0; k < n; ++k) count += kept(probs[k], floor);
  return count;
}

// Scratch of one call: a row's kept words and their weights.
template <typename T>
struct KeptWords {
  explicit KeptWords(int64_t K) : words(new int32_t[K]), w(new T[K]) {}
  std::unique_ptr<int32_t[]> words;
  std::unique_ptr<T[]> w;
};

template <typename T>
void peaked_reconstructions(const T* probs, const T* Ct, int64_t rows, int64_t M, int64_t d, int64_t K,
                            T floor, T* out) {
  KeptWords<T> kw(K);
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = probs + r * K;
    const int64_t n = list_kept(p, K, floor, kw.words.get());
    for (int64_t i = 0; i < n; ++i) kw.w[i] = p[kw.words[i]];
    combine_rows(Ct + (r % M) * K * d, kw.words.get(), kw.w.get(), n, d, out + r * d);
  }
}

template <typename T>
void peaked_backward_rows(const T* probs, const T* grad_probs, const T* grad_quantized,
                          const T* grad_entropy, const T* Ct, const T* At, int64_t rows, int64_t M,
                          int64_t d, int64_t K, T scale, const T* norms, T floor, T* g, T* grad_x,
                          int32_t* kept_words, int32_t* kept_counts) {
  const std::unique_ptr<T[]> u_of_kept(new T[K]);
  T* u = u_of_kept.get();
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = probs + r * K;
    const int64_t book = r % M;
    int32_t* words = kept_words + r * K;
    const int64_t n = list_kept(p, K, floor, words);
    kept_counts[r] = static_cast<int32_t>(n);
    // u[i] = dL/dp of kept word i (dH/dp_k = -(log p_k + 1), whose constant cancels)
    for (int64_t i = 0; i < n; ++i) u[i] = grad_probs != nullptr ? grad_probs[r * K + words[i]] : T(0);
    if (grad_quantized != nullptr) add_row_dots(Ct + book * K * d, words, n, grad_quantized + r * d, d, u);
    const T gh = grad_entropy != nullptr ? grad_entropy[r] : T(0);
    if (gh != T(0)) {
      for (int64_t i = 0; i < n; ++i) u[i] -= p[words[i]] > T(0) ? gh * log_of(p[words[i]]) : T(0);
    }
    T pg = 0;
    for (int64_t i = 0; i < n; ++i) pg += p[words[i]] * u[i];
    const T sr = row_scale(scale, norms, r);
    T* gr = g + r * K;
    for (int64_t k = 0; k < K; ++k) gr[k] = T(0);
    for (int64_t i = 0; i < n; ++i) {
      u[i] = sr * p[words[i]] * (u[i] - pg);
      gr[words[i]] = u[i];
    }
    if (grad_x != nullptr) combine_rows(At + book * K * d, words, u, n, d, grad_x + r * d);
  }
}

template <typename T>
void peaked_weight_grad(const T* x, const T* g, const int32_t* kept_words, const int32_t* kept_counts,
                        int64_t B, int64_t M, int64_t d, int64_t K, int64_t book, int64_t j0, int64_t j1,
                        T* grad_t) {
  for (int64_t b = 0; b < B; ++b) {
    const int64_t r = b * M + book;
    const T* gr = g + r * K;
    const T* xr = x + r * d + j0;
    const int32_t* words = kept_words + r * K;
    for (int64_t i = 0; i < kept_counts[r]; ++i) {
      axpy(grad_t + int64_t(words[i]) * (j1 - j0), gr[words[i]], xr, j1 - j0);
    }
  }
}

// Transposes of the weights that the kept-word products read by rows, in tiles of kTransposeTile x
// kTransposeTile elements (row_kernels.h).

// o[c, r] = s[r, c] for r in [r0, r1), c in [c0, c1): s [R, C], o [C, R]
template <typename T>
inline void transpose_scalar(const T* s, T* o, int64_t R, int64_t C, int64_t r0, int64_t r1, int64_t c0,
                             int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    for (int64_t r = r0; r < r1; ++r) o[c * R + r] = s[r * C + c];
  }
}

template <typename T>
void transpose_rows(const T* s, T* o, int64_t R, int64_t C, int64_t r0, int64_t r1) {
  for (int64_t c0 = 0; c0 < C; c0 += kTransposeTile) {
    transpose_scalar(s, o, R, C, r0, r1, c0, c0 + kTransposeTile < C ? c0 + kTransposeTile : C);
  }
}

// The 8 x 8 block at s (row stride sr) transposed into o (row stride so), in registers: pairs of rows
// interleaved, then pairs of pairs, then the 128-bit halves (the unpack, shuffle, permute sequence).
inline void transpose8x8(const float* s, int64_t sr, float* o, int64_t so) {
  VecF r[8], t[8], u[8];
  for (int i = 0; i < 8; ++i) r[i] = load(s + i * sr);
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int h = 0; h < 2; ++h) {
      u[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
      u[i + 2 * h + 1] = __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    }
  }
  for (int j = 0; j < 4; ++j) {
    store(o + j * so, __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11));
    store(o + (j + 4) * so, __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15));
  }
}

template <>
void transpose_rows<float>(const float* s, float* o, int64_t R, int64_t C, int64_t r0, int64_t r1) {
  const int64_t r8 = r0 + (r1 - r0) / 8 * 8;
  for (int64_t c0 = 0; c0 < C; c0 += kTransposeTile) {
    const int64_t c1 = c0 + kTransposeTile < C ? c0 + kTransposeTile : C, c8 = c0 + (c1 - c0) / 8 * 8;
    for (int64_t r = r0; r < r8; r += 8) {
      for (int64_t c = c0; c < c8; c += 8) transpose8x8(s + r * C + c, C, o + c * R + r, R);
    }
    transpose_scalar(s, o, R, C, r8, r1, c0, c8);
    transpose_scalar(s, o, R, C, r0, r1, c8, c1);
  }
}
