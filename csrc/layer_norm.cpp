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
// a pass for the mean, one for the variance (two passes: no cancellation), one
// to write y. float32 tensors are computed in float32, float64 in float64.
// Reference: lessons_pkg/kernels/reference.py (layer_norm).
#include <torch/library.h>

#include "common.h"
#include "output_buffers.h"

namespace lessons_kernels {
namespace {

using at::vec::Vectorized;

// x, y: [rows, h]; w, b: [h]; mean, rstd: [rows].
template <typename T>
void forward(const T* x, const T* w, const T* b, T* y, T* mean, T* rstd, int64_t rows, int64_t h, T eps) {
  using Vec = Vectorized<T>;
  at::parallel_for(0, rows, rows_per_task(h), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * h;
      T* yr = y + r * h;
      // loadu(ptr, n) reads n lanes; row_sum zeroes the missing lanes of the tail
      const T mu0 = row_sum<T>(h, [&](int64_t j, int n) { return Vec::loadu(xr + j, n); }) / T(h);
      // Second pass on d = x - mu0 (exact when x is near mu0). Its sum corrects the mean
      // for the rounding of the first pass, and var = (sum d^2 - (sum d)^2 / h) / h
      // (the corrected two-pass formula) has no catastrophic cancellation.
      const Vec vmu0(mu0);
      const auto [sum_d, sum_sq] = row_sum2<T>(h, [&](int64_t j, int n) {
        const Vec d = Vec::loadu(xr + j, n) - vmu0;
        return std::make_pair(d, d * d);
      });
      const T mu = mu0 + sum_d / T(h);
      const T var = std::max(T(0), (sum_sq - sum_d * sum_d / T(h)) / T(h));
      const T rs = T(1) / std::sqrt(var + eps);
      const Vec vmu(mu), vrs(rs);
      row_for_each<T>(h, [&](int64_t j, int n) {
        const Vec xhat = (Vec::loadu(xr + j, n) - vmu) * vrs;
        at::vec::fmadd(xhat, Vec::loadu(w + j, n), Vec::loadu(b + j, n)).store(yr + j, n);
      });
      mean[r] = mu;
      rstd[r] = rs;
    }
  });
}

// grad_y, x, grad_x: [rows, h]; partial: [num_chunks(rows), 2, h] receives, per
// chunk of kRowsPerChunk rows, the sums of gy * xhat (weight) and gy (bias).
template <typename T>
void backward(const T* grad_y, const T* x, const T* mean, const T* rstd, const T* w, T* grad_x, T* partial,
              int64_t rows, int64_t h) {
  using Vec = Vectorized<T>;
  at::parallel_for(0, num_chunks(rows), 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      T* acc_w = partial + c * 2 * h;
      T* acc_b = acc_w + h;
      std::fill(acc_w, acc_w + 2 * h, T(0));
      const int64_t row_end = std::min(rows, (c + 1) * kRowsPerChunk);
      for (int64_t r = c * kRowsPerChunk; r < row_end; ++r) {
        const T* gy = grad_y + r * h;
        const T* xr = x + r * h;
        const Vec vmu(mean[r]), vrs(rstd[r]);
        // Pass 1: the row sums of g = gy * w and of g * xhat; this row's share of gw and gb.
        const auto [sum_g, sum_gx] = row_sum2<T>(h, [&](int64_t j, int n) {
          const Vec dy = Vec::loadu(gy + j, n);
          const Vec xhat = (Vec::loadu(xr + j, n) - vmu) * vrs;
          (Vec::loadu(acc_b + j, n) + dy).store(acc_b + j, n);
          at::vec::fmadd(dy, xhat, Vec::loadu(acc_w + j, n)).store(acc_w + j, n);
          const Vec g = dy * Vec::loadu(w + j, n);
          return std::make_pair(g, g * xhat);
        });
        const Vec g_mean(sum_g / T(h)), gx_mean(sum_gx / T(h));
        // Pass 2: gx = rstd * (g - avg(g) - xhat * avg(g * xhat)).
        row_for_each<T>(h, [&](int64_t j, int n) {
          const Vec xhat = (Vec::loadu(xr + j, n) - vmu) * vrs;
          const Vec g = Vec::loadu(gy + j, n) * Vec::loadu(w + j, n);
          (vrs * (g - g_mean - xhat * gx_mean)).store(grad_x + r * h + j, n);
        });
      }
    }
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
  at::Tensor y = new_output_like(x), mean = rows_of(x), rstd = rows_of(x);
  const int64_t h = x.size(-1);
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
  at::Tensor grad_x = new_output_like(x);
  at::Tensor partial = at::empty({num_chunks(rows), 2, h}, x.options());  // [chunks, (w, b), h]
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "layer_norm_backward_cpu", [&] {
    backward<scalar_t>(grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                       mean.const_data_ptr<scalar_t>(), rstd.const_data_ptr<scalar_t>(),
                       weight.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
                       partial.mutable_data_ptr<scalar_t>(), rows, h);
  });
  at::Tensor sums = partial.sum(0);  // [2, h]
  return {grad_x, sums[0], sums[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lessons_kernels, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cpu);
  m.impl("layer_norm_backward", &layer_norm_backward_cpu);
}

}  // namespace lessons_kernels
