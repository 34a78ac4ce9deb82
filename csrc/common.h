// Shared by the CPU kernels (csrc/*.cpp): constants, the vector type, checks.
#pragma once

// Light headers (not <ATen/ATen.h>): they compile in a fraction of the time.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace lessons_kernels {

// GeLU, tanh approximation: 0.5 y (1 + tanh(kGeluK0 (y + kGeluK1 y^3))).
constexpr double kGeluK0 = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluK1 = 0.044715;

// Reductions over rows (the bias, weight and bias gradients) are summed in
// fixed chunks of this many rows, then the chunks are summed: the result does
// not depend on the number of threads, and float32 sums stay short.
constexpr int64_t kRowsPerChunk = 64;

// Work per parallel task: enough elements that starting a task is negligible.
constexpr int64_t kGrainElements = 1 << 15;

inline int64_t rows_per_task(int64_t row_length) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_length));
}

inline int64_t num_chunks(int64_t rows) {
  return (rows + kRowsPerChunk - 1) / kRowsPerChunk;
}

// Sum and maximum of the lanes of one vector.
template <typename T>
T lanes_sum(const at::vec::Vectorized<T>& v) {
  alignas(64) T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T s = 0;
  for (T lane : lanes) s += lane;
  return s;
}

template <typename T>
T lanes_max(const at::vec::Vectorized<T>& v) {
  alignas(64) T lanes[at::vec::Vectorized<T>::size()];
  v.store(lanes);
  T m = lanes[0];
  for (T lane : lanes) m = std::max(m, lane);
  return m;
}

#define LESSONS_CHECK_CPU(t) \
  TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor here, got ", (t).device())
#define LESSONS_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

}  // namespace lessons_kernels
