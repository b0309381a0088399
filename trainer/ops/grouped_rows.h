// What the ops that solve one side of a factorisation row by row share: the
// check of pairs grouped by row, and running whole rows in chunks on threads.
//
// Pairs come grouped by row: those of row e are positions
// offsets[e] .. offsets[e + 1] - 1 of `other` (the other side's row).  Each
// row's arithmetic must not depend on the thread that runs it, so the
// outputs are bit-identical for any thread count.
//
// Included by sample_rows.cc and ials_solve.cc; trainer/ops/kernels.py hashes it
// with the sources, so an edit rebuilds the library.

#ifndef MOVIELENS_TRAINER_GROUPED_ROWS_H_
#define MOVIELENS_TRAINER_GROUPED_ROWS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "tensorflow/core/framework/tensor.h"

namespace movielens {

// OK when offsets is [rows + 1] from 0 to the pairs and never decreasing, and
// every entry of other is a row of a table with other_rows rows.
inline absl::Status CheckGroupedRows(const ::tensorflow::Tensor& offsets,
                                     const ::tensorflow::Tensor& other, int64_t other_rows) {
  if (offsets.dims() != 1 || offsets.NumElements() < 1) {
    return absl::InvalidArgumentError("offsets must be a vector of rows + 1");
  }
  if (other.dims() != 1) return absl::InvalidArgumentError("other must be a vector");
  const int64_t rows = offsets.NumElements() - 1;
  const int64_t pairs = other.NumElements();
  const auto offset = offsets.flat<int64_t>();
  if (offset(0) != 0 || offset(rows) != pairs) {
    return absl::InvalidArgumentError("offsets must start at 0 and end at the pairs");
  }
  for (int64_t e = 0; e < rows; ++e) {
    if (offset(e) > offset(e + 1)) return absl::InvalidArgumentError("offsets must not decrease");
  }
  const auto index = other.flat<int32_t>();
  for (int64_t n = 0; n < pairs; ++n) {
    if (index(n) < 0 || index(n) >= other_rows) {
      return absl::InvalidArgumentError(
          "other[" + std::to_string(n) + "] = " + std::to_string(index(n)) +
          " is not a row of other_table (" + std::to_string(other_rows) + " rows)");
    }
  }
  return absl::OkStatus();
}

// First rows of chunks of whole rows holding about chunk_pairs pairs (and at
// most max_rows rows) each, then rows.
inline std::vector<int64_t> ChunkRows(const int64_t* offsets, int64_t rows, int64_t chunk_pairs,
                                      int64_t max_rows = std::numeric_limits<int64_t>::max()) {
  std::vector<int64_t> chunks{0};
  for (int64_t e = 0; e < rows; ++e) {
    if (offsets[e + 1] - offsets[chunks.back()] >= chunk_pairs || e + 1 - chunks.back() >= max_rows) {
      chunks.push_back(e + 1);
    }
  }
  if (chunks.back() != rows) chunks.push_back(rows);
  return chunks;
}

// Runs the chunks on min(threads, 64, chunks) threads, this one included.
// make_worker() is called once per thread and returns a callable (first row,
// last row) holding that thread's scratch.
template <typename MakeWorker>
void RunChunks(const std::vector<int64_t>& chunks, int threads, const MakeWorker& make_worker) {
  const int64_t num_chunks = static_cast<int64_t>(chunks.size()) - 1;
  const int used = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({threads, 64, num_chunks})));
  std::atomic<int64_t> next_chunk{0};
  auto work = [&chunks, &next_chunk, &make_worker, num_chunks] {
    auto worker = make_worker();
    for (;;) {
      const int64_t chunk = next_chunk.fetch_add(1);
      if (chunk >= num_chunks) return;
      worker(chunks[chunk], chunks[chunk + 1]);
    }
  };
  std::vector<std::thread> helpers;
  for (int t = 1; t < used; ++t) helpers.emplace_back(work);
  work();
  for (auto& helper : helpers) helper.join();
}

}  // namespace movielens

#endif  // MOVIELENS_TRAINER_GROUPED_ROWS_H_
