// Scaled masked softmax and its causal variant on CUDA, forward and backward.
// Same maths and mask layout as csrc/scaled_masked_softmax.cpp (see there);
// arithmetic in float32; a fully masked row is written as zeros.
//
// One warp per row. Forward, pass 1: each lane walks its elements j = lane,
// lane + 32, ... keeping an online maximum m and sum s of exp(score - m)
// (when a larger score arrives, s is rescaled by exp(m_old - m_new)); the 32
// (m, s) pairs are then merged with warp shuffles. Pass 2 re-reads the row
// (now in L1/L2) and writes exp(score - m) / s. Backward: one pass for
// sum(gp * p), one to write scale * p * (gp - sum).
#include <torch/library.h>

#include "common.cuh"

namespace lessons_kernels {
namespace {

constexpr int kThreads = 128;  // 4 warps, 4 rows per block
constexpr int kRowsPerBlock = kThreads / kWarp;

enum class Mask { kNone, kBool, kAdditive, kCausal };

template <typename T, Mask M>
__device__ __forceinline__ at::opmath_type<T> score(const T* x, const void* mask, int64_t j, int64_t len,
                                                    at::opmath_type<T> scale) {
  using A = at::opmath_type<T>;
  const A minus_inf = -std::numeric_limits<A>::infinity();
  if (M == Mask::kCausal && j >= len) return minus_inf;
  const A s = static_cast<A>(x[j]) * scale;
  if (M == Mask::kBool) return static_cast<const bool*>(mask)[j] ? minus_inf : s;
  if (M == Mask::kAdditive) return s + static_cast<A>(static_cast<const T*>(mask)[j]);
  return s;
}

// x, y: [rows = n * sq, sk]; mask: [mb, msq, sk] (kBool / kAdditive).
template <typename T, Mask M>
__global__ void forward_kernel(const T* __restrict__ x, const void* __restrict__ mask, T* __restrict__ y,
                               int64_t rows, int64_t sq, int64_t sk, int64_t heads, int64_t mb, int64_t msq,
                               at::opmath_type<T> scale) {
  using A = at::opmath_type<T>;
  const A minus_inf = -std::numeric_limits<A>::infinity();
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / kWarp;
  if (r >= rows) return;
  const int64_t k = r / sq, i = r % sq;
  const int64_t len = M == Mask::kCausal ? i + 1 : sk;
  const T* xr = x + r * sk;
  T* yr = y + r * sk;
  const void* mr = nullptr;
  if (M == Mask::kBool || M == Mask::kAdditive) {
    const int64_t offset = ((mb == 1 ? 0 : k / heads) * msq + (msq == 1 ? 0 : i)) * sk;
    mr = M == Mask::kBool ? static_cast<const void*>(static_cast<const bool*>(mask) + offset)
                          : static_cast<const void*>(static_cast<const T*>(mask) + offset);
  }

  // Pass 1: this lane's online maximum and sum of exponentials.
  A m = minus_inf, s = 0;
  for (int64_t j = lane; j < len; j += kWarp) {
    const A v = score<T, M>(xr, mr, j, len, scale);
    if (v > m) {
      s = s * exp_acc(m - v) + A(1);  // m = -inf: s is 0 and exp(-inf) = 0
      m = v;
    } else if (v != minus_inf) {
      s += exp_acc(v - m);
    }
  }
  // Merge the 32 lanes' (m, s).
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const A m2 = __shfl_xor_sync(0xffffffffu, m, offset);
    const A s2 = __shfl_xor_sync(0xffffffffu, s, offset);
    const A top = m > m2 ? m : m2;
    s = (m == minus_inf ? A(0) : s * exp_acc(m - top)) + (m2 == minus_inf ? A(0) : s2 * exp_acc(m2 - top));
    m = top;
  }

  // Pass 2: write the probabilities (zeros where masked, and for a fully masked row).
  const A inv = m == minus_inf ? A(0) : A(1) / s;
  for (int64_t j = lane; j < sk; j += kWarp) {
    const A v = score<T, M>(xr, mr, j, len, scale);
    yr[j] = static_cast<T>(v == minus_inf ? A(0) : exp_acc(v - m) * inv);
  }
}

// grad_y, probs, grad_x: [rows, sk]. Causal: row r = (k, i) reads only keys j <= i = r % sk.
template <typename T, bool kCausal>
__global__ void backward_kernel(const T* __restrict__ grad_y, const T* __restrict__ probs, T* __restrict__ grad_x,
                                int64_t rows, int64_t sk, at::opmath_type<T> scale) {
  using A = at::opmath_type<T>;
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / kWarp;
  if (r >= rows) return;
  const int64_t len = kCausal ? r % sk + 1 : sk;
  const T* g = grad_y + r * sk;
  const T* p = probs + r * sk;
  A dot = 0;
  for (int64_t j = lane; j < len; j += kWarp) dot += static_cast<A>(g[j]) * static_cast<A>(p[j]);
  dot = warp_sum(dot);
  for (int64_t j = lane; j < sk; j += kWarp) {
    grad_x[r * sk + j] = j < len ? static_cast<T>(scale * static_cast<A>(p[j]) * (static_cast<A>(g[j]) - dot))
                                 : static_cast<T>(0);
  }
}

template <typename T, Mask M>
void launch_forward(const at::Tensor& x, const void* mask, at::Tensor& y, int64_t sq, int64_t sk, int64_t heads,
                    int64_t mb, int64_t msq, double scale) {
  const int64_t rows = sk ? x.numel() / sk : 0;
  if (rows == 0) return;
  forward_kernel<T, M><<<ceil_div(rows, kRowsPerBlock), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<T>(), mask, y.mutable_data_ptr<T>(), rows, sq, sk, heads, mb, msq,
      static_cast<at::opmath_type<T>>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor scaled_masked_softmax_forward_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                              int64_t heads, double scale) {
  LESSONS_CHECK_CUDA(x);
  LESSONS_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() >= 2, "softmax: x must be [..., sq, sk], got ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t sq = x.size(-2), sk = x.size(-1), n = sq * sk ? x.numel() / (sq * sk) : 0;
  at::Tensor y = at::empty_like(x);
  if (!mask.has_value()) {
    LESSONS_DISPATCH(x.scalar_type(), "scaled_softmax_forward_cuda", [&] {
      launch_forward<scalar_t, Mask::kNone>(x, nullptr, y, sq, sk, 1, 1, 1, scale);
    });
    return y;
  }
  const at::Tensor& m = *mask;
  LESSONS_CHECK_CUDA(m);
  LESSONS_CHECK_CONTIGUOUS(m);
  TORCH_CHECK(m.dim() == 3 && (m.size(1) == 1 || m.size(1) == sq) && m.size(2) == sk,
              "softmax: mask must be [mb, 1 or ", sq, ", ", sk, "], got ", m.sizes());
  TORCH_CHECK(heads >= 1 && (m.size(0) == 1 || m.size(0) * heads == n), "softmax: mask has ", m.size(0),
              " slices; x has ", n, " = slices * heads (", heads, ") rows of [sq, sk] needed");
  const bool is_bool = m.scalar_type() == at::kBool;
  TORCH_CHECK(is_bool || m.scalar_type() == x.scalar_type(), "softmax: mask must be bool or ", x.scalar_type(),
              ", got ", m.scalar_type());
  LESSONS_DISPATCH(x.scalar_type(), "scaled_masked_softmax_forward_cuda", [&] {
    if (is_bool) {
      launch_forward<scalar_t, Mask::kBool>(x, m.const_data_ptr(), y, sq, sk, heads, m.size(0), m.size(1), scale);
    } else {
      launch_forward<scalar_t, Mask::kAdditive>(x, m.const_data_ptr(), y, sq, sk, heads, m.size(0), m.size(1),
                                                scale);
    }
  });
  return y;
}

at::Tensor scaled_upper_triang_masked_softmax_forward_cuda(const at::Tensor& x, double scale) {
  LESSONS_CHECK_CUDA(x);
  LESSONS_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() == 3 && x.size(1) == x.size(2), "causal softmax: x must be [n, sq, sq], got ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty_like(x);
  LESSONS_DISPATCH(x.scalar_type(), "scaled_upper_triang_masked_softmax_forward_cuda", [&] {
    launch_forward<scalar_t, Mask::kCausal>(x, nullptr, y, x.size(1), x.size(2), 1, 1, 1, scale);
  });
  return y;
}

at::Tensor softmax_backward_cuda(const at::Tensor& grad_y, const at::Tensor& probs, double scale, bool causal) {
  LESSONS_CHECK_CUDA(probs);
  LESSONS_CHECK_CONTIGUOUS(probs);
  LESSONS_CHECK_CONTIGUOUS(grad_y);
  TORCH_CHECK(grad_y.sizes() == probs.sizes() && grad_y.scalar_type() == probs.scalar_type(),
              "softmax backward: grad ", grad_y.sizes(), " ", grad_y.scalar_type(), " vs probs ", probs.sizes(), " ",
              probs.scalar_type());
  TORCH_CHECK(!causal || (probs.dim() == 3 && probs.size(1) == probs.size(2)),
              "causal softmax backward: probs must be [n, sq, sq], got ", probs.sizes());
  const c10::cuda::CUDAGuard guard(probs.device());
  at::Tensor grad_x = at::empty_like(probs);
  const int64_t sk = probs.size(-1), rows = sk ? probs.numel() / sk : 0;
  if (rows == 0) return grad_x;
  LESSONS_DISPATCH(probs.scalar_type(), "softmax_backward_cuda", [&] {
    const auto blocks = ceil_div(rows, kRowsPerBlock);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const auto s = static_cast<at::opmath_type<scalar_t>>(scale);
    if (causal) {
      backward_kernel<scalar_t, true><<<blocks, kThreads, 0, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), probs.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
          rows, sk, s);
    } else {
      backward_kernel<scalar_t, false><<<blocks, kThreads, 0, stream>>>(
          grad_y.const_data_ptr<scalar_t>(), probs.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
          rows, sk, s);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_x;
}

at::Tensor scaled_softmax_backward_cuda(const at::Tensor& grad_y, const at::Tensor& probs, double scale) {
  return softmax_backward_cuda(grad_y, probs, scale, /*causal=*/false);
}

at::Tensor scaled_upper_triang_masked_softmax_backward_cuda(const at::Tensor& grad_y, const at::Tensor& probs,
                                                            double scale) {
  return softmax_backward_cuda(grad_y, probs, scale, /*causal=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(lessons_kernels, CUDA, m) {
  m.impl("scaled_masked_softmax_forward", &scaled_masked_softmax_forward_cuda);
  m.impl("scaled_upper_triang_masked_softmax_forward", &scaled_upper_triang_masked_softmax_forward_cuda);
  m.impl("scaled_softmax_backward", &scaled_softmax_backward_cuda);
  m.impl("scaled_upper_triang_masked_softmax_backward", &scaled_upper_triang_masked_softmax_backward_cuda);
}

}  // namespace lessons_kernels
