// LayerNorm with affine weight and bias on CUDA, forward and backward.
// Same maths as csrc/layer_norm.cpp (see there); statistics and arithmetic in
// float32; mean and rstd are saved in float32.
//
// Forward and grad_x: one warp per row, lanes striding over the row (coalesced),
// sums merged with warp shuffles; the row's later passes hit L1/L2.
// grad_weight, grad_bias: sums over rows, so a second kernel with one thread
// per column j walks a group of rows (like csrc/cuda/bias_gelu.cu) and writes
// per-group partial sums, which are then summed.
#include <torch/library.h>

#include "common.cuh"

namespace lessons_kernels {
namespace {

constexpr int kThreads = 128;  // 4 warps: 4 rows per block
constexpr int kRowsPerBlock = kThreads / kWarp;
constexpr int kColumnThreads = 256;
constexpr int64_t kMaxRowGroups = 256;

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                               T* __restrict__ y, at::opmath_type<T>* __restrict__ mean,
                               at::opmath_type<T>* __restrict__ rstd, int64_t rows, int64_t h,
                               at::opmath_type<T> eps) {
  using A = at::opmath_type<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / kWarp;
  if (r >= rows) return;
  const T* xr = x + r * h;
  A sum = 0;
  for (int64_t j = lane; j < h; j += kWarp) sum += static_cast<A>(xr[j]);
  const A mu0 = warp_sum(sum) / A(h);
  // Corrected two-pass: the sum of d = x - mu0 fixes the rounding of mu0, and (sum d^2 - (sum d)^2 / h)
  // does not cancel. (The CPU kernel gets both in one pass over x - x[0]; this one is unchanged: it
  // needs a GPU to measure.)
  A sd = 0, sq = 0;
  for (int64_t j = lane; j < h; j += kWarp) {
    const A d = static_cast<A>(xr[j]) - mu0;
    sd += d;
    sq += d * d;
  }
  sd = warp_sum(sd);
  const A mu = mu0 + sd / A(h);
  const A var = fmaxf(A(0), (warp_sum(sq) - sd * sd / A(h)) / A(h));
  const A rs = rsqrt_acc(var + eps);
  for (int64_t j = lane; j < h; j += kWarp) {
    y[r * h + j] = static_cast<T>((static_cast<A>(xr[j]) - mu) * rs * static_cast<A>(w[j]) + static_cast<A>(b[j]));
  }
  if (lane == 0) {
    mean[r] = mu;
    rstd[r] = rs;
  }
}

template <typename T>
__global__ void grad_input_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                  const at::opmath_type<T>* __restrict__ mean,
                                  const at::opmath_type<T>* __restrict__ rstd, const T* __restrict__ w,
                                  T* __restrict__ grad_x, int64_t rows, int64_t h) {
  using A = at::opmath_type<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / kWarp;
  if (r >= rows) return;
  const T* gy = grad_y + r * h;
  const T* xr = x + r * h;
  const A mu = mean[r], rs = rstd[r];
  A g_sum = 0, gx_sum = 0;
  for (int64_t j = lane; j < h; j += kWarp) {
    const A g = static_cast<A>(gy[j]) * static_cast<A>(w[j]);
    g_sum += g;
    gx_sum += g * (static_cast<A>(xr[j]) - mu) * rs;
  }
  const A g_mean = warp_sum(g_sum) / A(h), gx_mean = warp_sum(gx_sum) / A(h);
  for (int64_t j = lane; j < h; j += kWarp) {
    const A g = static_cast<A>(gy[j]) * static_cast<A>(w[j]);
    const A xhat = (static_cast<A>(xr[j]) - mu) * rs;
    grad_x[r * h + j] = static_cast<T>(rs * (g - g_mean - xhat * gx_mean));
  }
}

// partial: [2, gridDim.y, h]: sums of gy * xhat (weight) and of gy (bias) per row group.
template <typename T>
__global__ void grad_affine_kernel(const T* __restrict__ grad_y, const T* __restrict__ x,
                                   const at::opmath_type<T>* __restrict__ mean,
                                   const at::opmath_type<T>* __restrict__ rstd,
                                   at::opmath_type<T>* __restrict__ partial, int64_t rows, int64_t h) {
  using A = at::opmath_type<T>;
  const int64_t j = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (j >= h) return;
  A gw = 0, gb = 0;
  for (int64_t r = blockIdx.y; r < rows; r += gridDim.y) {
    const A dy = static_cast<A>(grad_y[r * h + j]);
    gw += dy * (static_cast<A>(x[r * h + j]) - mean[r]) * rstd[r];
    gb += dy;
  }
  partial[blockIdx.y * h + j] = gw;
  partial[(gridDim.y + blockIdx.y) * h + j] = gb;
}

void check_affine(const at::Tensor& x, const at::Tensor& t, const char* name) {
  LESSONS_CHECK_CONTIGUOUS(t);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(-1) && t.scalar_type() == x.scalar_type() &&
                  t.device() == x.device(),
              "layer_norm: ", name, " ", t.sizes(), " ", t.scalar_type(), " must be [", x.size(-1), "] ",
              x.scalar_type(), " on ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                                       const at::Tensor& bias, double eps) {
  LESSONS_CHECK_CUDA(x);
  LESSONS_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() >= 1, "layer_norm: x must have a last dim");
  check_affine(x, weight, "weight");
  check_affine(x, bias, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t h = x.size(-1), rows = h ? x.numel() / h : 0;
  const auto stats = x.options().dtype(at::toOpMathType(x.scalar_type()));
  at::Tensor y = at::empty_like(x), mean = at::empty({rows}, stats), rstd = at::empty({rows}, stats);
  if (rows == 0) return {y, mean, rstd};
  LESSONS_DISPATCH(x.scalar_type(), "layer_norm_forward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t><<<ceil_div(rows, kRowsPerBlock), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), weight.const_data_ptr<scalar_t>(), bias.const_data_ptr<scalar_t>(),
        y.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<A>(), rstd.mutable_data_ptr<A>(), rows, h,
        static_cast<A>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                                        const at::Tensor& weight) {
  LESSONS_CHECK_CUDA(x);
  LESSONS_CHECK_CONTIGUOUS(x);
  LESSONS_CHECK_CONTIGUOUS(grad_y);
  check_affine(x, weight, "weight");
  const int64_t h = x.size(-1), rows = h ? x.numel() / h : 0;
  const auto acc_type = at::toOpMathType(x.scalar_type());
  TORCH_CHECK(grad_y.sizes() == x.sizes() && mean.numel() == rows && rstd.numel() == rows &&
                  mean.scalar_type() == acc_type && rstd.scalar_type() == acc_type,
              "layer_norm backward: grad_y ", grad_y.sizes(), ", x ", x.sizes(), ", mean ", mean.sizes(), ", rstd ",
              rstd.sizes(), " do not fit together");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor grad_x = at::empty_like(x);
  const dim3 grid(static_cast<unsigned>(ceil_div(h, kColumnThreads)),
                  static_cast<unsigned>(std::max<int64_t>(1, std::min(rows, kMaxRowGroups))));
  at::Tensor partial = at::empty({2, static_cast<int64_t>(grid.y), h}, x.options().dtype(acc_type));
  if (rows == 0) {
    at::Tensor zeros = partial.zero_().sum(1).to(x.scalar_type());
    return {grad_x, zeros[0], zeros[1]};
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  LESSONS_DISPATCH(x.scalar_type(), "layer_norm_backward_cuda", [&] {
    using A = at::opmath_type<scalar_t>;
    grad_input_kernel<scalar_t><<<ceil_div(rows, kRowsPerBlock), kThreads, 0, stream>>>(
        grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<A>(),
        rstd.const_data_ptr<A>(), weight.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(), rows, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_affine_kernel<scalar_t><<<grid, kColumnThreads, 0, stream>>>(
        grad_y.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), mean.const_data_ptr<A>(),
        rstd.const_data_ptr<A>(), partial.mutable_data_ptr<A>(), rows, h);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  at::Tensor sums = partial.sum(1).to(x.scalar_type());  // [2, h]
  return {grad_x, sums[0], sums[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lessons_kernels, CUDA, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cuda);
  m.impl("layer_norm_backward", &layer_norm_backward_cuda);
}

}  // namespace lessons_kernels
