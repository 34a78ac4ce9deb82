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
#include <utility>

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

// Sum and maximum of the lanes of one vector: a shuffle tree (4 steps for 16 floats with
// AVX512, at::vec::vec_reduce_all) rather than 15 dependent scalar adds, which on rows of a
// few hundred elements cost as much as the row's arithmetic.
template <typename T>
T lanes_sum(const at::vec::Vectorized<T>& v) {
  using Vec = at::vec::Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](const Vec& a, const Vec& b) { return a + b; }, v);
}

template <typename T>
T lanes_max(const at::vec::Vectorized<T>& v) {
  using Vec = at::vec::Vectorized<T>;
  return at::vec::vec_reduce_all<T>([](const Vec& a, const Vec& b) { return at::vec::maximum(a, b); }, v);
}

// Reductions over one row, with FOUR independent vector accumulators. One
// accumulator makes every add wait for the previous one (4 cycles of latency
// per vector); four keep the adder busy, which makes a row of 256 floats
// about 3x faster. f(j, n) returns the vector of elements j .. j + n - 1 of
// the row; n is the full width except in the tail, whose missing lanes are
// replaced by the reduction's identity here (f may store as a side effect).
template <typename T, typename F>
T row_sum(int64_t len, const F& f) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int W = Vec::size();
  Vec a0(0), a1(0), a2(0), a3(0);
  int64_t j = 0;
  for (; j + 4 * W <= len; j += 4 * W) {
    a0 = a0 + f(j, W);
    a1 = a1 + f(j + W, W);
    a2 = a2 + f(j + 2 * W, W);
    a3 = a3 + f(j + 3 * W, W);
  }
  for (; j + W <= len; j += W) a0 = a0 + f(j, W);
  if (j < len) {
    const int n = static_cast<int>(len - j);
    a1 = a1 + Vec::set(Vec(0), f(j, n), n);
  }
  return lanes_sum((a0 + a1) + (a2 + a3));
}

// Two sums in one pass: f(j, n) returns a pair of vectors (four accumulators each).
template <typename T, typename F>
std::pair<T, T> row_sum2(int64_t len, const F& f) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int W = Vec::size();
  Vec a[4] = {Vec(0), Vec(0), Vec(0), Vec(0)}, b[4] = {Vec(0), Vec(0), Vec(0), Vec(0)};
  int64_t j = 0;
  for (; j + 4 * W <= len; j += 4 * W) {
    for (int k = 0; k < 4; ++k) {
      const auto [u, v] = f(j + k * W, W);
      a[k] = a[k] + u;
      b[k] = b[k] + v;
    }
  }
  for (; j + W <= len; j += W) {
    const auto [u, v] = f(j, W);
    a[0] = a[0] + u;
    b[0] = b[0] + v;
  }
  if (j < len) {
    const int n = static_cast<int>(len - j);
    const auto [u, v] = f(j, n);
    a[1] = a[1] + Vec::set(Vec(0), u, n);
    b[1] = b[1] + Vec::set(Vec(0), v, n);
  }
  return {lanes_sum((a[0] + a[1]) + (a[2] + a[3])), lanes_sum((b[0] + b[1]) + (b[2] + b[3]))};
}

template <typename T, typename F>
T row_max(int64_t len, const F& f) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int W = Vec::size();
  const Vec lowest(-std::numeric_limits<T>::infinity());
  Vec a0 = lowest, a1 = lowest, a2 = lowest, a3 = lowest;
  int64_t j = 0;
  for (; j + 4 * W <= len; j += 4 * W) {
    a0 = at::vec::maximum(a0, f(j, W));
    a1 = at::vec::maximum(a1, f(j + W, W));
    a2 = at::vec::maximum(a2, f(j + 2 * W, W));
    a3 = at::vec::maximum(a3, f(j + 3 * W, W));
  }
  for (; j + W <= len; j += W) a0 = at::vec::maximum(a0, f(j, W));
  if (j < len) {
    const int n = static_cast<int>(len - j);
    a1 = at::vec::maximum(a1, Vec::set(lowest, f(j, n), n));
  }
  return lanes_max(at::vec::maximum(at::vec::maximum(a0, a1), at::vec::maximum(a2, a3)));
}

// Apply f(j, n) to every vector of a row (element-wise passes, no reduction).
template <typename T, typename F>
void row_for_each(int64_t len, const F& f) {
  constexpr int W = at::vec::Vectorized<T>::size();
  int64_t j = 0;
  for (; j + W <= len; j += W) f(j, W);
  if (j < len) f(j, static_cast<int>(len - j));
}

#define LESSONS_CHECK_CPU(t) \
  TORCH_CHECK((t).device().is_cpu(), #t " must be a CPU tensor here, got ", (t).device())
#define LESSONS_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

}  // namespace lessons_kernels
