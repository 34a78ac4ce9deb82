// LayerNorm over the last dim with affine weight and bias on the CPU, forward and backward.
//
//   forward:  mean = avg(x), rstd = 1 / sqrt(avg((x - mean)^2) + eps)
//             y = (x - mean) * rstd * w + b            reads x, w, b; writes y, mean, rstd
//   backward: xhat = (x - mean) * rstd, g = gy * w
//             gx = rstd * (g - avg(g) - xhat * avg(g * xhat))
//             gw = sum over rows of gy * xhat, gb = sum over rows of gy
//                                                      reads gy, x, w, mean, rstd; writes gx (gw, gb)
//
// Each row (a few KB) is read from memory once and then worked on in L1 cache:
// one pass for the mean and the variance (shifted by the row's first element, so a
// large mean does not cancel the variance away; see forward_rows), one to write y.
// float32 tensors are computed in float32, float64 in float64.
//
// Short rows go kRowBlock at a time (see kBlockBytes). One row alone is mostly waiting: a short chain of
// dependent vector adds, a shuffle tree to sum the lanes, a division, a square
// root, each needing the previous result. The sums of four rows are independent,
// so the CPU overlaps them. Each pass still reads the block row after row (memory
// in order, which the hardware prefetcher follows: interleaving four rows vector by
// vector halved the speed on cold caches), except the backward's last pass, which
// walks the block's rows side by side (they are in L1 by then) so that the gw and
// gb accumulators are loaded and stored once per block instead of once per row.
// Every row is summed in the same order as it would be alone and the gw, gb sums
// add rows in order, so results do not depend on how rows are grouped (or split
// between threads).
// Reference: lessons_pkg/kernels/reference.py (layer_norm).
#include <torch/library.h>

#include "common.h"
#include "output_buffers.h"

namespace lessons_kernels {
namespace {

using at::vec::Vectorized;

constexpr int kRowBlock = 4;
static_assert(kRowsPerChunk % kRowBlock == 0, "a block of rows must not straddle two gradient chunks");
// Rows go in blocks only while a block fits in 8 KB (h <= 512 floats), so that its rows
// stay in L1 next to what the passes write: short rows (the course's h = 256) gain from
// blocks, while blocks of four 3-4 KB rows (h = 768, 1024) were slower than rows one by one
// (python -m lessons_pkg.kernels.bench, forward, at the 8192x1024).
constexpr int64_t kBlockBytes = 8192;

template <typename T>
inline bool use_blocks(int64_t h) {
  return kRowBlock * h * static_cast<int64_t>(sizeof(T)) <= kBlockBytes;
}

// v with its lanes n.. set to 0 (the tail of a row shorter than a vector).
template <typename T>
inline Vectorized<T> zero_tail(const Vectorized<T>& v, int n) {
  return n == Vectorized<T>::size() ? v : Vectorized<T>::set(Vectorized<T>(0), v, n);
}

// Calls f(j, n) for every vector of a row of h elements: j = 0, W, 2W, ...; n = W
// except in a shorter tail (loadu(p, n) / store(p, n) read and write n lanes).
template <typename T, typename F>
inline void row_vectors(int64_t h, const F& f) {
  constexpr int W = Vectorized<T>::size();
  int64_t j = 0;
  for (; j + W <= h; j += W) f(j, W);
  if (j < h) f(j, static_cast<int>(h - j));
}

// Like row_vectors, for sums: f(j, n, k) adds to accumulator k, alternately 0 and 1,
// so that two chains of dependent adds run side by side.
template <typename T, typename F>
inline void row_vectors2(int64_t h, const F& f) {
  constexpr int W = Vectorized<T>::size();
  int64_t j = 0;
  for (; j + 2 * W <= h; j += 2 * W) {
    f(j, W, 0);
    f(j + W, W, 1);
  }
  if (j + W <= h) {
    f(j, W, 0);
    j += W;
  }
  if (j < h) f(j, static_cast<int>(h - j), 1);
}

// The sums over one row of d = x - k and of d^2 (two accumulators each, see row_vectors2). Inlining is
// left to the compiler, which calls it: forced inline into forward_rows, the forward at 2048x256 took
// 140 us instead of 83.
template <typename T>
inline void shifted_sums(const T* row, T k, int64_t h, T& sum_d, T& sum_sq) {
  using Vec = Vectorized<T>;
  const Vec vk(k);
  Vec sd[2] = {Vec(0), Vec(0)}, sq[2] = {Vec(0), Vec(0)};
  row_vectors2<T>(h, [&](int64_t j, int n, int a) {
    const Vec d = zero_tail(Vec::loadu(row + j, n) - vk, n);
    sd[a] = sd[a] + d;
    sq[a] = at::vec::fmadd(d, d, sq[a]);
  });
  sum_d = lanes_sum(sd[0] + sd[1]);
  sum_sq = lanes_sum(sq[0] + sq[1]);
}

// A shift k is kept when the row's mean is within kMaxShift standard deviations of it: the variance
// then loses at most a factor 1 + kMaxShift^2 = 5 of its precision (float32 rows of zero mean with
// x[0] 1.9 deviations out erred up to 4x PyTorch's own LayerNorm; with a threshold of 4, rows with
// x[0] 3 to 5 deviations out erred 7x to 14x; tests/kernels/test_kernels_cpu.py pins it).
constexpr double kMaxShift = 2.0;

// R rows starting at x (row stride h); y, mean, rstd likewise.
template <typename T, int R>
inline void forward_rows(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd, int64_t h, T eps) {
  using Vec = Vectorized<T>;
  // Pass 1, both statistics at once, from the sums of d = x - k (the "shifted data" algorithm):
  //   mean = k + m with m = sum(d) / h,   h var = sum(d^2) - m sum(d).
  // With k = 0 this is E[x^2] - E[x]^2, which loses every digit when the mean is large against
  // the spread (activations around 3000 with unit spread: the two terms agree in all 7 digits
  // float32 holds). The subtraction loses a factor of 1 + m^2 / var, so k must be near the
  // mean: k = the row's first element, where a typical row has m^2 / var ~ 1. A row whose first
  // element is more than kMaxShift deviations from its mean (an outlier channel at index 0, the
  // one odd element of an otherwise flat row) is summed again, shifted by the mean just found:
  // the factor is then at most 1 + kMaxShift^2 = 5 for every row, and var exact to a few ulp times
  // it. (Rows of N(0, 1) values: 1 in 22 is summed twice.)
  T shift[R], sum_d[R], sum_sq[R];
  for (int r = 0; r < R; ++r) {
    shift[r] = x[r * h];
    shifted_sums<T>(x + r * h, shift[r], h, sum_d[r], sum_sq[r]);
  }
  Vec vmu[R], vrs[R];
  for (int r = 0; r < R; ++r) {
    T m = sum_d[r] / T(h), h_var = sum_sq[r] - m * sum_d[r];
    // m^2 > kMaxShift^2 var, or NaN: d^2 can overflow where (x - mean)^2 does not (|d| up to twice
    // as large), inf - inf is NaN, and the sums shifted by the mean are then the right ones
    if (!(m * m * T(h) <= T(kMaxShift * kMaxShift) * h_var)) {
      shift[r] += m;
      shifted_sums<T>(x + r * h, shift[r], h, sum_d[r], sum_sq[r]);
      m = sum_d[r] / T(h);
      h_var = sum_sq[r] - m * sum_d[r];
    }
    const T mu = shift[r] + m;
    T var = h_var / T(h);
    if (var < T(0)) var = T(0);  // rounding; a NaN (from NaN or inf in x) stays NaN, as in PyTorch
    const T rs = T(1) / std::sqrt(var + eps);
    mean[r] = mu;
    rstd[r] = rs;
    vmu[r] = Vec(mu);
    vrs[r] = Vec(rs);
  }
  // Pass 2: y = xhat * w + b, row after row. Walking the block's rows side by side would load w and b
  // once per block (the forward at 2048x256: 74-76 us instead of 83-86 with y's buffer in cache), but
  // with y's buffer cold, as one recycled from the output cache is in training, four interleaved
  // store streams took 405-420 us against 298-308 (docs/benchmarks.md, kernel item 7).
  for (int r = 0; r < R; ++r) {
    row_vectors<T>(h, [&](int64_t j, int n) {
      const Vec xhat = (Vec::loadu(x + r * h + j, n) - vmu[r]) * vrs[r];
      at::vec::fmadd(xhat, Vec::loadu(w + j, n), Vec::loadu(b + j, n)).store(y + r * h + j, n);
    });
  }
}

// x, y: [rows, h]; w, b: [h]; mean, rstd: [rows].
template <typename T>
void forward(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd, int64_t rows, int64_t h, T eps) {
  at::parallel_for(0, rows, rows_per_task(h), [&](int64_t begin, int64_t end) {
    int64_t r = begin;
    for (; use_blocks<T>(h) && r + kRowBlock <= end; r += kRowBlock)
      forward_rows<T, kRowBlock>(x + r * h, w, b, y + r * h, mean + r, rstd + r, h, eps);
    for (; r < end; ++r) forward_rows<T, 1>(x + r * h, w, b, y + r * h, mean + r, rstd + r, h, eps);
  });
}

// R rows starting at grad_y and x (row stride h): writes their grad_x and adds their
// shares of gw and gb to acc_w and acc_b, row by row in order.
template <typename T, int R>
inline void backward_rows(const T* grad_y, const T* x, const T* mean, const T* rstd, const T* w, T* grad_x,
                          T* acc_w, T* acc_b, int64_t h) {
  using Vec = Vectorized<T>;
  Vec vmu[R], vrs[R];
  for (int r = 0; r < R; ++r) {
    vmu[r] = Vec(mean[r]);
    vrs[r] = Vec(rstd[r]);
  }
  // Pass 1, row after row (reading memory in order): the row sums of g = gy * w and of
  // g * (x - mean); times rstd, the latter is the sum of g * xhat (one multiply per row, not per element).
  Vec g_mean[R], gx_mean[R];
  for (int r = 0; r < R; ++r) {
    Vec sg[2] = {Vec(0), Vec(0)}, sgx[2] = {Vec(0), Vec(0)};
    row_vectors2<T>(h, [&](int64_t j, int n, int a) {
      const Vec g = zero_tail(Vec::loadu(grad_y + r * h + j, n) * Vec::loadu(w + j, n), n);
      sg[a] = sg[a] + g;
      sgx[a] = at::vec::fmadd(g, Vec::loadu(x + r * h + j, n) - vmu[r], sgx[a]);
    });
    g_mean[r] = Vec(lanes_sum(sg[0] + sg[1]) / T(h));
    gx_mean[r] = Vec(lanes_sum(sgx[0] + sgx[1]) * rstd[r] / T(h));
  }
  // Pass 2, the R rows side by side (all in L1 now): grad_x, and the rows' shares of gw and
  // gb added to acc_w and acc_b in row order, each accumulator vector loaded and stored once.
  row_vectors<T>(h, [&](int64_t j, int n) {
    const Vec wj = Vec::loadu(w + j, n);
    Vec aw = Vec::loadu(acc_w + j, n), ab = Vec::loadu(acc_b + j, n);
    for (int r = 0; r < R; ++r) {
      const Vec dy = Vec::loadu(grad_y + r * h + j, n);
      const Vec xhat = (Vec::loadu(x + r * h + j, n) - vmu[r]) * vrs[r];
      ab = ab + dy;
      aw = at::vec::fmadd(dy, xhat, aw);
      // gx = rstd * (g - avg(g) - xhat * avg(g * xhat)); g - avg(g) first: exact where g is flat
      // (a fused multiply-subtract here is one instruction less, but leaves the rounding error of
      // g in the result: with h = 1, where rstd = 1 / sqrt(eps), grad_x was off by up to 7e-5)
      const Vec centred = dy * wj - g_mean[r];
      (vrs[r] * at::vec::fnmadd(xhat, gx_mean[r], centred)).store(grad_x + r * h + j, n);
    }
    aw.store(acc_w + j, n);
    ab.store(acc_b + j, n);
  });
}

// grad_y, x, grad_x: [rows, h]; partial: [num_chunks(rows), 2, h] receives, per
// chunk of kRowsPerChunk rows, the sums of gy * xhat (weight) and gy (bias).
template <typename T>
void backward(const T* grad_y, const T* x, const T* mean, const T* rstd, const T* w, T* grad_x, T* partial,
              int64_t rows, int64_t h) {
  at::parallel_for(0, num_chunks(rows), 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      T* acc_w = partial + c * 2 * h;
      T* acc_b = acc_w + h;
      std::fill(acc_w, acc_w + 2 * h, T(0));
      const int64_t row_end = std::min(rows, (c + 1) * kRowsPerChunk);
      int64_t r = c * kRowsPerChunk;
      for (; use_blocks<T>(h) && r + kRowBlock <= row_end; r += kRowBlock)
        backward_rows<T, kRowBlock>(grad_y + r * h, x + r * h, mean + r, rstd + r, w, grad_x + r * h, acc_w, acc_b, h);
      for (; r < row_end; ++r)
        backward_rows<T, 1>(grad_y + r * h, x + r * h, mean + r, rstd + r, w, grad_x + r * h, acc_w, acc_b, h);
    }
  });
}

// gw[j] = sum over chunks c of partial[c][0][j], gb[j] likewise of partial[c][1][j].
template <typename T>
void sum_chunks(const T* partial, int64_t chunks, int64_t h, T* gw, T* gb) {
  using Vec = Vectorized<T>;
  row_vectors<T>(h, [&](int64_t j, int n) {
    Vec sw(0), sb(0);
    for (int64_t c = 0; c < chunks; ++c) {
      sw = sw + Vec::loadu(partial + c * 2 * h + j, n);
      sb = sb + Vec::loadu(partial + c * 2 * h + h + j, n);
    }
    sw.store(gw + j, n);
    sb.store(gb + j, n);
  });
}

at::Tensor rows_of(const at::Tensor& x) {
  return at::empty({x.size(-1) ? x.numel() / x.size(-1) : 0}, x.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                      const at::Tensor& bias, double eps) {
  LESSONS_CHECK_CPU(x);
  LESSONS_CHECK_CONTIGUOUS(x);
  LESSONS_CHECK_CONTIGUOUS(weight);
  LESSONS_CHECK_CONTIGUOUS(bias);
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && bias.dim() == 1 && weight.size(0) == x.size(-1) &&
                  bias.size(0) == x.size(-1),
              "layer_norm: weight ", weight.sizes(), " and bias ", bias.sizes(), " must match the last dim of x ",
              x.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type(),
              "layer_norm: x, weight, bias must have one dtype");
  const int64_t h = x.size(-1);
  // y apart from x (csrc/output_buffers.h): up to 25 us of 82 at 2048x256 otherwise, depending on the process
  at::Tensor y = new_output_like(x, {x.const_data_ptr()}, row_period(h * x.element_size()));
  at::Tensor mean = rows_of(x), rstd = rows_of(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_forward_cpu", [&] {
    forward<scalar_t>(x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(),
                      bias.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                      mean.mutable_data_ptr<scalar_t>(), rstd.mutable_data_ptr<scalar_t>(), mean.numel(), h,
                      static_cast<scalar_t>(eps));
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                                       const at::Tensor& mean, const at::Tensor& rstd,
                                                                       const at::Tensor& weight) {
  LESSONS_CHECK_CPU(x);
  LESSONS_CHECK_CONTIGUOUS(grad_y);
  LESSONS_CHECK_CONTIGUOUS(x);
  LESSONS_CHECK_CONTIGUOUS(weight);
  const int64_t h = x.size(-1), rows = h ? x.numel() / h : 0;
  TORCH_CHECK(grad_y.sizes() == x.sizes() && mean.numel() == rows && rstd.numel() == rows && weight.numel() == h,
              "layer_norm backward: grad_y ", grad_y.sizes(), ", x ", x.sizes(), ", mean ", mean.sizes(), ", rstd ",
              rstd.sizes(), ", weight ", weight.sizes(), " do not fit together");
  // grad_x apart from grad_y and x (csrc/output_buffers.h): up to 25 us of 109 at 2048x256 otherwise
  at::Tensor grad_x =
      new_output_like(x, {grad_y.const_data_ptr(), x.const_data_ptr()}, row_period(h * x.element_size()));
  at::Tensor partial = at::empty({num_chunks(rows), 2, h}, x.options());  // [chunks, (w, b), h]
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_backward_cpu", [&] {
    backward<scalar_t>(grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                       mean.const_data_ptr<scalar_t>(), rstd.const_data_ptr<scalar_t>(),
                       weight.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
                       partial.mutable_data_ptr<scalar_t>(), rows, h);
  });
  // gw and gb: the chunks' sums added in chunk order (the same result for any number of threads)
  at::Tensor grad_w = at::empty({h}, x.options()), grad_b = at::empty({h}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_backward_cpu_sum", [&] {
    sum_chunks<scalar_t>(partial.const_data_ptr<scalar_t>(), num_chunks(rows), h, grad_w.mutable_data_ptr<scalar_t>(),
                         grad_b.mutable_data_ptr<scalar_t>());
  });
  return {grad_x, grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(lessons_kernels, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

}  // namespace lessons_kernels
