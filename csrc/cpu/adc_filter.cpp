#include "cpu/adc_filter.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace opqn::cpu {

namespace {

// Where a table's constant tail starts: every entry from it on equals the last one (a table of
// K < 256 words is padded with one value; a full one has a tail of one entry).
int64_t tail_start(const float* row) {
  constexpr int64_t kChunk = 16;  // whole chunks are compared without a branch per entry
  const float last = row[255];
  int64_t w = 256;
  while (w >= kChunk) {
    bool same = true;
    for (int64_t i = w - kChunk; i < w; ++i) same &= row[i] == last;
    if (!same) break;
    w -= kChunk;
  }
  w = std::min<int64_t>(w, 255);
  while (w > 0 && row[w - 1] == last) --w;
  return w;
}

// The smallest and largest of a book's entries (finite: the ops reject NaN): its first `width`
// and the tail's value, in independent lanes the compiler pipelines.
struct Range {
  float lo, hi;
};
Range range_of(const float* row, int64_t width) {
  constexpr int kLanes = 8;
  float lo[kLanes], hi[kLanes];
  for (int i = 0; i < kLanes; ++i) lo[i] = hi[i] = row[255];
  for (int64_t w0 = 0; w0 < width; w0 += kLanes) {
    for (int i = 0; i < kLanes && w0 + i < width; ++i) {
      lo[i] = row[w0 + i] < lo[i] ? row[w0 + i] : lo[i];
      hi[i] = row[w0 + i] > hi[i] ? row[w0 + i] : hi[i];
    }
  }
  Range r{lo[0], hi[0]};
  for (int i = 1; i < kLanes; ++i) {
    r.lo = lo[i] < r.lo ? lo[i] : r.lo;
    r.hi = hi[i] > r.hi ? hi[i] : r.hi;
  }
  return r;
}

// The byte of one entry: a first guess (truncation of a clamped, non-negative value: its floor),
// raised wherever rounding left it low. The clamp sends a NaN (from a non-finite table, which the
// ops reject) to 0, never to an undefined conversion that would start the raising far below 0; it
// is written as comparisons, not std::fmax/fmin (library calls here).
uint8_t level_of(float value, double low, double step, double per_step) {
  const double scaled = (double(value) - low) * per_step;
  int32_t level = static_cast<int32_t>(scaled > 0.0 ? (scaled < 255.0 ? scaled : 255.0) : 0.0);
  while (level < 255 && low + double(level + 1) * step < double(value)) ++level;
  return static_cast<uint8_t>(level);
}

}  // namespace

void build_filter_tables(const float* luts, int64_t nq, int64_t M, FilterTables& out) {
  out.M = M;
  out.bytes.resize(static_cast<size_t>(nq * M * 256));
  out.widths.resize(static_cast<size_t>(nq * M));
  out.base.resize(static_cast<size_t>(nq));
  out.step.resize(static_cast<size_t>(nq));
  out.slack.resize(static_cast<size_t>(nq));
  std::vector<float> highest(static_cast<size_t>(M));
  std::vector<int64_t> tails(static_cast<size_t>(M));
  for (int64_t q = 0; q < nq; ++q) {
    const float* lut = luts + q * M * 256;
    double widest = 0.0, magnitude = 0.0;  // max over books of (max - min), sum of max |entry|
    for (int64_t m = 0; m < M; ++m) {
      tails[m] = tail_start(lut + m * 256);
      const auto [lo, hi] = range_of(lut + m * 256, tails[m]);
      highest[m] = hi;
      widest = std::max(widest, double(hi) - double(lo));
      magnitude += std::max(std::fabs(double(lo)), std::fabs(double(hi)));
    }
    const double step = widest > 0.0 ? widest / 255.0 : (magnitude > 0.0 ? magnitude : 1.0);
    const double per_step = 1.0 / step;
    double low_sum = 0.0;
    for (int64_t m = 0; m < M; ++m) {
      const float* row = lut + m * 256;
      uint8_t* bytes = out.bytes.data() + (q * M + m) * 256;
      const double low = double(highest[m]) - 255.0 * step;
      low_sum += low;
      for (int64_t w = 0; w < tails[m]; ++w) bytes[w] = level_of(row[w], low, step, per_step);
      const uint8_t tail = level_of(row[255], low, step, per_step);  // one value: one byte
      std::fill(bytes + tails[m], bytes + 256, tail);
      int64_t width = tails[m];
      while (width > 0 && bytes[width - 1] == tail) --width;
      out.widths[q * M + m] = static_cast<int16_t>(width);
    }
    out.base[q] = low_sum + double(M) * step;
    out.step[q] = step;
    // A float sum of M terms is off by at most (M - 1) 2^-24 sum |terms|; the margin (2^-22, and
    // the relative 2^-40 for this function's double arithmetic) is far above both.
    out.slack[q] = magnitude * (double(M) * 0x1p-22 + 0x1p-40) + std::fabs(low_sum) * 0x1p-40;
  }
}

int16_t threshold_bytes(const FilterTables& tables, int64_t q, float threshold) {
  if (!(threshold > -INFINITY)) return -1;
  // score > threshold  =>  base + Q step > threshold - slack  =>  Q > x
  const double x = (double(threshold) - tables.slack[q] - tables.base[q]) / tables.step[q];
  if (x >= 32767.0) return 32767;
  if (x < 0.0) return -1;
  return static_cast<int16_t>(std::max(std::floor(x) - 1.0, -1.0));
}

}  // namespace opqn::cpu
