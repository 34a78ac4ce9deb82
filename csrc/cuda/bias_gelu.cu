// bias + GeLU (tanh approximation) on CUDA, forward and backward.
// Same maths as csrc/bias_gelu.cpp (see there); arithmetic in float32.
//
// Grid: x over column tiles of the hidden dim, y over groups of rows. A thread
// owns one column j: it loads bias[j] once, then walks rows r = blockIdx.y,
// blockIdx.y + gridDim.y, ...; neighbouring threads touch neighbouring
// addresses (coalesced). In backward the thread also sums its column of
// grad_x, so the bias gradient costs no extra pass over memory: partial[y][j],
// then a sum over the (few) y.
#include <torch/library.h>

#include "common.cuh"

namespace lessons_kernels {
namespace {

constexpr double kGeluK0 = 0.7978845608028654;  // sqrt(2 / pi)
constexpr double kGeluK1 = 0.044715;
constexpr int kThreads = 256;
constexpr int64_t kMaxRowGroups = 256;

template <typename A>
__device__ __forceinline__ A gelu(A v) {
  const A t = tanh_acc(A(kGeluK0) * (v + A(kGeluK1) * v * v * v));
  return A(0.5) * v * (A(1) + t);
}

template <typename A>
__device__ __forceinline__ A gelu_grad(A v) {
  const A t = tanh_acc(A(kGeluK0) * (v + A(kGeluK1) * v * v * v));
  return A(0.5) * (A(1) + t) + A(0.5) * v * (A(1) - t * t) * A(kGeluK0) * (A(1) + A(3 * kGeluK1) * v * v);
}

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ bias, T* __restrict__ y,
                               int64_t rows, int64_t h) {
  using A = at::opmath_type<T>;
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= h) return;
  const A b = static_cast<A>(bias[j]);
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    y[r * h + j] = static_cast<T>(gelu(static_cast<A>(x[r * h + j]) + b));
  }
}

// partial: [gridDim.y, h] in the accumulation type.
template <typename T>
__global__ void backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ x, const T* __restrict__ bias,
                                T* __restrict__ grad_x, at::opmath_type<T>* __restrict__ partial, int64_t rows,
                                int64_t h) {
  using A = at::opmath_type<T>;
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= h) return;
  const A b = static_cast<A>(bias[j]);
  A column_sum = 0;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const A g = static_cast<A>(grad_y[r * h + j]) * gelu_grad(static_cast<A>(x[r * h + j]) + b);
    grad_x[r * h + j] = static_cast<T>(g);
    column_sum += g;
  }
  partial[blockIdx.y * h + j] = column_sum;
}

dim3 grid_for(int64_t rows, int64_t h) {
  return dim3(static_cast<unsigned>(ceil_div(h, kThreads)),
              static_cast<unsigned>(std::max<int64_t>(1, std::min(rows, kMaxRowGroups))));
}

void check_inputs(const at::Tensor& x, const at::Tensor& bias) {
  LESSONS_CHECK_CUDA(x);
  LESSONS_CHECK_CONTIGUOUS(x);
  LESSONS_CHECK_CONTIGUOUS(bias);
  TORCH_CHECK(x.dim() >= 1 && bias.dim() == 1 && bias.size(0) == x.size(-1),
              "bias_gelu: bias of shape ", bias.sizes(), " does not match the last dim of x ", x.sizes());
  TORCH_CHECK(bias.scalar_type() == x.scalar_type() && bias.device() == x.device(),
              "bias_gelu: bias and x differ in dtype or device");
}

at::Tensor bias_gelu_forward_cuda(const at::Tensor& x, const at::Tensor& bias) {
  check_inputs(x, bias);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  const int64_t h = x.size(-1), rows = h ? x.numel() / h : 0;
  if (x.numel() == 0) return y;
  LESSONS_DISPATCH(x.scalar_type(), "bias_gelu_forward_cuda", [&] {
    forward_kernel<scalar_t><<<grid_for(rows, h), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), rows, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> bias_gelu_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                           const at::Tensor& bias) {
  check_inputs(x, bias);
  LESSONS_CHECK_CONTIGUOUS(grad_y);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), "bias_gelu: grad_y ", grad_y.sizes(), " vs x ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  const int64_t h = x.size(-1), rows = h ? x.numel() / h : 0;
  const dim3 grid = grid_for(rows, h);
  const auto acc_type = at::toOpMathType(x.scalar_type());
  at::Tensor partial = at::empty({static_cast<int64_t>(grid.y), h}, x.options().dtype(acc_type));  // [groups, h]
  if (rows == 0) return {grad_x, partial.zero_().sum(0).to(x.scalar_type())};
  LESSONS_DISPATCH(x.scalar_type(), "bias_gelu_backward_cuda", [&] {
    backward_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
        grad_x.mutable_data_ptr<scalar_t>(), partial.mutable_data_ptr<at::opmath_type<scalar_t>>(), rows, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_x, partial.sum(0).to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(lessons_kernels, CUDA, m) {
  m.impl("bias_gelu_forward", &bias_gelu_forward_cuda);
  m.impl("bias_gelu_backward", &bias_gelu_backward_cuda);
}

}  // namespace lessons_kernels
