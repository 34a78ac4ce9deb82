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

#include <initializer_list>

namespace lessons_kernels {

constexpr size_t kMinPooledBytes = size_t(1) << 20;     // 1 MiB
constexpr size_t kMaxCachedBytes = size_t(512) << 20;   // freed buffers kept at most (per process)
constexpr size_t kPage = 4096;

// An uninitialised contiguous CPU tensor of these sizes and options.
//
// Placed apart from the inputs (pooled buffers only): a kernel that stores out[i] and then loads
// in[i + a little] stalls when the two addresses agree in their low 12 bits, because the core
// matches loads against earlier stores by those bits first ("4K aliasing"). PyTorch puts the
// inputs at any 64-byte offset within a 4 KB page, so an output at a fixed offset is sometimes
// just above an input: the LayerNorm kernels at 2048x256 then took up to 25 us (forward, 82 ->
// 106 us) and 25 us (backward, 109 -> 134 us) longer, depending on the process. So each pooled
// buffer has a page of slack, and the tensor starts at the 64-byte offset whose distance, modulo
// `period` bytes, from every pointer in `apart_from` is largest. `period`: the distance between the
// addresses the kernel walks side by side, such as one row when it works on rows side by side
// (a power of two dividing 4096; 4096 when they only walk one stream each). The LayerNorm kernels
// use it, where it was measured to help (docs/benchmarks.md, kernel item 8); the others, where it
// made no difference beyond the noise, do not pass `apart_from`.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                      std::initializer_list<const void*> apart_from = {}, size_t period = kPage);

inline at::Tensor new_output_like(const at::Tensor& x, std::initializer_list<const void*> apart_from = {},
                                  size_t period = kPage) {
  return new_output(x.sizes(), x.options(), apart_from, period);
}

// The `period` for rows of `row_bytes` bytes worked on side by side: the largest power of two that
// divides both row_bytes and 4096 (rows 1 KB long repeat every 1 KB modulo a page), or 4096 when
// that is under 256 bytes (rows at scattered offsets: only the stream starts can be kept apart).
size_t row_period(size_t row_bytes);

// Bytes currently held in the cache (for tests and the benchmark).
size_t cached_output_bytes();

}  // namespace lessons_kernels
