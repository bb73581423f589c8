#include "cpu/adc_filter.h"

#include <algorithm>
#include <cmath>
#include <vector>

namespace opqn::cpu {

namespace {

// The smallest and largest of a book's 256 entries (finite: the ops reject NaN), in loops the
// compiler vectorizes.
struct Range {
  float lo, hi;
};
Range range_of(const float* row) {
  float lo = row[0], hi = row[0];
  for (int64_t w = 1; w < 256; ++w) {
    lo = row[w] < lo ? row[w] : lo;
    hi = row[w] > hi ? row[w] : hi;
  }
  return {lo, hi};
}

}  // namespace

void build_filter_tables(const float* luts, int64_t nq, int64_t M, FilterTables& out) {
  out.M = M;
  out.bytes.resize(static_cast<size_t>(nq * M * 256));
  out.base.resize(static_cast<size_t>(nq));
  out.step.resize(static_cast<size_t>(nq));
  out.slack.resize(static_cast<size_t>(nq));
  for (int64_t q = 0; q < nq; ++q) {
    const float* lut = luts + q * M * 256;
    double widest = 0.0, magnitude = 0.0;  // max over books of (max - min), sum of max |entry|
    std::vector<float> highest(static_cast<size_t>(M));
    for (int64_t m = 0; m < M; ++m) {
      const auto [lo, hi] = range_of(lut + m * 256);
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
      // a first guess (truncation of a clamped, non-negative value: its floor), then one raised
      // wherever rounding left it low; the clamp sends a NaN (from a non-finite table, which the ops
      // reject) to 0, never to an undefined conversion that would start the raising far below 0.
      // Written as comparisons, not std::fmax/fmin (library calls here), so that the loop vectorizes.
      int32_t levels[256];
      for (int64_t w = 0; w < 256; ++w) {
        const double scaled = (double(row[w]) - low) * per_step;
        levels[w] = static_cast<int32_t>(scaled > 0.0 ? (scaled < 255.0 ? scaled : 255.0) : 0.0);
      }
      for (int64_t w = 0; w < 256; ++w) {
        int32_t level = levels[w];
        while (level < 255 && low + double(level + 1) * step < double(row[w])) ++level;
        bytes[w] = static_cast<uint8_t>(level);
      }
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
