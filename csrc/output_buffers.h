// Output tensors of the CPU kernels, served from a cache of freed buffers.
//
// A fresh multi-megabyte buffer from malloc is fresh pages from the kernel
// (glibc mmaps blocks above its threshold, at most 32 MiB, and unmaps them on
// free): its first write takes one page fault per 4 KiB page, ~1 us each, which
// is most of the time of a LayerNorm forward (12 of 15 ms for 8192x1024 on this
// course's CPU). Training allocates the same sizes every iteration, so a freed
// output is kept (up to a cap) and handed out again: its pages are already mapped.
// This is what PyTorch's CUDA caching allocator does for GPU memory, here for
// our kernels' CPU outputs only (PyTorch's own CPU ops still use malloc).
//
// Buffers smaller than kMinPooledBytes come from at::empty (malloc's heap
// reuses those pages already). Like at::empty, a pooled buffer is not zeroed;
// under torch.use_deterministic_algorithms(True) with
// torch.utils.deterministic.fill_uninitialized_memory it is filled with NaN,
// exactly as at::empty would be (the tests rely on that poisoning).
#pragma once

#include <ATen/core/Tensor.h>

namespace lessons_kernels {

constexpr size_t kMinPooledBytes = size_t(1) << 20;     // 1 MiB
constexpr size_t kMaxCachedBytes = size_t(512) << 20;   // freed buffers kept at most (per process)

// An uninitialised contiguous CPU tensor of these sizes and options.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

inline at::Tensor new_output_like(const at::Tensor& x) {
  return new_output(x.sizes(), x.options());
}

// Bytes currently held in the cache (for tests and the benchmark).
size_t cached_output_bytes();

}  // namespace lessons_kernels
