// Byte tables for an exact filtered ADC scan. A query's float table [M, 256] is mapped to bytes
// with one step size for all books (the widest book's range / 255), so that every entry is bounded
// from above:
//   lut[m, w] <= low[m] + (bytes[m, w] + 1) * step      (low[m] = max_w lut[m, w] - 255 * step)
// (an entry below low[m] would be byte 0 and still bounded). A code's byte sum Q then bounds its
// exact score: score <= sum_m low[m] + (Q + M) * step, up to the rounding of the float sum.
// threshold_bytes turns a float top-k threshold T into the largest integer t such that every code
// whose float score exceeds T has Q > t; a scan that re-scores exactly only the codes with Q > t
// therefore keeps exactly the codes a full float scan keeps.
#pragma once

#include <cstdint>
#include <vector>

namespace opqn::cpu {

struct FilterTables {
  int64_t M = 0;
  std::vector<uint8_t> bytes;  // [nq, M, 256]
  std::vector<int16_t> widths;  // [nq, M]: every byte from this one on equals the table's last
  std::vector<double> base;    // [nq]: sum_m low[m] + M * step
  std::vector<double> step;    // [nq]
  std::vector<double> slack;   // [nq]: bound on |float score - exact score| of any code
};

// luts: [nq, M, 256] padded float tables.
void build_filter_tables(const float* luts, int64_t nq, int64_t M, FilterTables& out);

// -1 (every code passes) up to 32767 (none can).
int16_t threshold_bytes(const FilterTables& tables, int64_t q, float threshold);

}  // namespace opqn::cpu
