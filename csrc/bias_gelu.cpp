// bias + GeLU (tanh approximation) on the CPU, forward and backward.
//
//   forward:  y = gelu(x + b)                       reads x, b; writes y
//   backward: gx = gy * gelu'(x + b), gb = sum(gx)  reads gy, x, b; writes gx (and gb)
//
//   gelu(v)  = 0.5 v (1 + t),  t = tanh(k0 (v + k1 v^3))
//   gelu'(v) = 0.5 (1 + t) + 0.5 v (1 - t^2) k0 (1 + 3 k1 v^2)
// computed through the logistic function s = (1 + t) / 2 (below).
//
// Eager PyTorch runs these as ~8 separate element-wise ops, each reading and
// writing the whole tensor; here every element is loaded once, kept in a vector
// register (at::vec::Vectorized: 16 floats with AVX512) and stored once.
// Rows are split over threads with at::parallel_for.
// Reference: lessons_pkg/kernels/reference.py (bias_gelu, bias_gelu_backward).
#include <torch/library.h>

#include "common.h"
#include "output_buffers.h"

namespace lessons_kernels {
namespace {

using at::vec::Vectorized;

// With s = 1 / (1 + e), e = exp(-2u), u = k0 (v + k1 v^3):  0.5 (1 + tanh(u)) = s, so
//   gelu(v)  = v s
//   gelu'(v) = s + 2 v s (1 - s) k0 (1 + 3 k1 v^2),  s (1 - s) = e s^2 (no cancellation near s = 1)
// One exp (at::vec's exp_u20: a degree-5 polynomial, <= 20 ulp in float32; the exact
// exp in float64) and one division instead of a tanh: about twice as fast as Sleef's tanh.
// -2u is capped at kMaxExponent, where e stays finite (e s is then 1, not inf * 0 = NaN);
// the cap changes s only where it is below exp(-kMaxExponent) = 1.8e-35.
constexpr double kMaxExponent = 80.0;

template <typename T>
Vectorized<T> exp_minus_2u(const Vectorized<T>& v) {
  const Vectorized<T> minus_2k0(-2 * kGeluK0), k1(kGeluK1), cap(kMaxExponent);
  return at::vec::minimum(minus_2k0 * at::vec::fmadd(k1 * v, v * v, v), cap).exp_u20();
}

template <typename T>
Vectorized<T> gelu(const Vectorized<T>& v) {
  const Vectorized<T> one(1);
  return v / (one + exp_minus_2u(v));
}

template <typename T>
Vectorized<T> gelu_grad(const Vectorized<T>& v) {
  const Vectorized<T> two_k0(2 * kGeluK0), k1x3(3 * kGeluK1), one(1);
  const Vectorized<T> e = exp_minus_2u(v);
  const Vectorized<T> s = one / (one + e);
  const Vectorized<T> s_1ms = e * s * s;  // s (1 - s)
  return at::vec::fmadd(v * s_1ms, two_k0 * at::vec::fmadd(k1x3, v * v, one), s);
}

// x, y: [rows, h]; bias: [h].
template <typename T>
void forward(const T* x, const T* bias, T* y, int64_t rows, int64_t h) {
  using Vec = Vectorized<T>;
  at::parallel_for(0, rows, rows_per_task(h), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * h;
      T* yr = y + r * h;
      int64_t j = 0;
      for (; j + Vec::size() <= h; j += Vec::size()) {
        gelu(Vec::loadu(xr + j) + Vec::loadu(bias + j)).store(yr + j);
      }
      if (j < h) {  // the last, partial vector: load/store only h - j lanes
        const int n = static_cast<int>(h - j);
        gelu(Vec::loadu(xr + j, n) + Vec::loadu(bias + j, n)).store(yr + j, n);
      }
    }
  });
}

// grad_y, x, grad_x: [rows, h]; bias: [h]; partial: [num_chunks(rows), h], chunk c
// receives the sum of grad_x over rows [c * kRowsPerChunk, (c + 1) * kRowsPerChunk).
template <typename T>
void backward(const T* grad_y, const T* x, const T* bias, T* grad_x, T* partial, int64_t rows, int64_t h) {
  using Vec = Vectorized<T>;
  at::parallel_for(0, num_chunks(rows), 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      T* acc = partial + c * h;
      std::fill(acc, acc + h, T(0));
      const int64_t row_end = std::min(rows, (c + 1) * kRowsPerChunk);
      for (int64_t r = c * kRowsPerChunk; r < row_end; ++r) {
        const int64_t o = r * h;
        int64_t j = 0;
        for (; j + Vec::size() <= h; j += Vec::size()) {
          const Vec g = Vec::loadu(grad_y + o + j) * gelu_grad(Vec::loadu(x + o + j) + Vec::loadu(bias + j));
          g.store(grad_x + o + j);
          (Vec::loadu(acc + j) + g).store(acc + j);
        }
        if (j < h) {
          const int n = static_cast<int>(h - j);
          const Vec g = Vec::loadu(grad_y + o + j, n) * gelu_grad(Vec::loadu(x + o + j, n) + Vec::loadu(bias + j, n));
          g.store(grad_x + o + j, n);
          (Vec::loadu(acc + j, n) + g).store(acc + j, n);
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& bias) {
  LESSONS_CHECK_CPU(x);
  LESSONS_CHECK_CONTIGUOUS(x);
  LESSONS_CHECK_CONTIGUOUS(bias);
  TORCH_CHECK(x.dim() >= 1 && bias.dim() == 1 && bias.size(0) == x.size(-1),
              "bias_gelu: bias of shape ", bias.sizes(), " does not match the last dim of x ", x.sizes());
  TORCH_CHECK(bias.scalar_type() == x.scalar_type(), "bias_gelu: bias is ", bias.scalar_type(), ", x is ",
              x.scalar_type());
}

at::Tensor bias_gelu_forward_cpu(const at::Tensor& x, const at::Tensor& bias) {
  check_inputs(x, bias);
  at::Tensor y = new_output_like(x);
  const int64_t h = x.size(-1), rows = h ? x.numel() / h : 0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bias_gelu_forward_cpu", [&] {
    forward<scalar_t>(x.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(),
                      rows, h);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                          const at::Tensor& bias) {
  check_inputs(x, bias);
  LESSONS_CHECK_CONTIGUOUS(grad_y);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "bias_gelu: grad_y ", grad_y.sizes(), " vs x ", x.sizes());
  at::Tensor grad_x = new_output_like(x);
  const int64_t h = x.size(-1), rows = h ? x.numel() / h : 0;
  at::Tensor partial = at::empty({num_chunks(rows), h}, x.options());  // [chunks, h]
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bias_gelu_backward_cpu", [&] {
    backward<scalar_t>(grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                       bias.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
                       partial.mutable_data_ptr<scalar_t>(), rows, h);
  });
  return {grad_x, partial.sum(0)};  // [h]
}

}  // namespace

TORCH_LIBRARY_IMPL(lessons_kernels, CPU, m) {
  m.impl("bias_gelu_forward", &bias_gelu_forward_cpu);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cpu);
}

}  // namespace lessons_kernels
