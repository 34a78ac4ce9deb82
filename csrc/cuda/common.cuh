// Shared by the CUDA kernels (csrc/cuda/*.cu): warp reductions, math in the
// accumulation type, launch helpers. float16 / bfloat16 values are converted to
// float32 on load and back on store: all arithmetic is float32.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs the cuBLAS/cuSPARSE headers
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>

namespace lessons_kernels {

constexpr int kWarp = 32;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;  // every lane holds the sum
}

// Accurate expf / tanhf (no --use_fast_math: its tanh.approx has 2^-11 relative error). These
// kernels are memory-bound: the extra instructions are hidden behind the loads.
__device__ __forceinline__ float exp_acc(float v) { return ::expf(v); }
__device__ __forceinline__ float tanh_acc(float v) { return ::tanhf(v); }
__device__ __forceinline__ float rsqrt_acc(float v) { return ::rsqrtf(v); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

#define LESSONS_CHECK_CUDA(t) \
  TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor here, got ", (t).device())
#define LESSONS_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

// float32, float16, bfloat16 (float64 is CPU-only: it is there for gradcheck).
#define LESSONS_DISPATCH(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace lessons_kernels
