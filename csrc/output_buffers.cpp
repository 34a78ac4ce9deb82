// The cache of freed output buffers: see output_buffers.h.
#include "output_buffers.h"

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fill.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace lessons_kernels {
namespace {

constexpr size_t kAlignment = 64;  // one cache line, the widest vector load

// Free buffers by exact byte size (an iteration asks for the same sizes again).
// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors ran.
struct Cache {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<void*>> free;
  size_t cached_bytes = 0;
};

Cache& cache() {
  static Cache* c = new Cache();
  return *c;
}

void* acquire(size_t bytes) {
  {
    Cache& c = cache();
    std::lock_guard<std::mutex> lock(c.mutex);
    auto it = c.free.find(bytes);
    if (it != c.free.end() && !it->second.empty()) {
      void* p = it->second.back();
      it->second.pop_back();
      c.cached_bytes -= bytes;
      return p;
    }
  }
  void* p = std::aligned_alloc(kAlignment, bytes);  // bytes is a multiple of kAlignment
  TORCH_CHECK(p != nullptr, "lessons_kernels: out of memory allocating ", bytes, " bytes");
  return p;
}

void release(void* p, size_t bytes) {
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (c.cached_bytes + bytes <= kMaxCachedBytes) {
      c.free[bytes].push_back(p);
      c.cached_bytes += bytes;
      return;
    }
  }
  std::free(p);
}

// The offset (a multiple of kAlignment, below `period`) at which a tensor starts in the block at
// `base`: the one farthest, modulo `period`, from every pointer in `apart_from` (see the header).
size_t placement(uintptr_t base, std::initializer_list<const void*> apart_from, size_t period) {
  size_t best = 0, best_gap = 0;
  for (size_t offset = 0; offset < period; offset += kAlignment) {
    size_t gap = period;
    for (const void* p : apart_from) {
      // unsigned wrap-around is arithmetic modulo 2^64, which period (a power of two) divides
      const size_t d = (base + offset - reinterpret_cast<uintptr_t>(p)) % period;
      gap = std::min(gap, std::min(d, period - d));
    }
    if (gap > best_gap) {
      best_gap = gap;
      best = offset;
    }
  }
  return best;
}

}  // namespace

size_t row_period(size_t row_bytes) {
  size_t period = kPage;
  while (period > 1 && row_bytes % period != 0) period /= 2;
  return period < 256 ? kPage : period;
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                      std::initializer_list<const void*> apart_from, size_t period) {
  TORCH_CHECK(period > 0 && period <= kPage && kPage % period == 0, "new_output: period ", period,
              " must be a power of two dividing ", kPage);
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (nbytes < kMinPooledBytes || !options.device().is_cpu()) return at::empty(sizes, options);
  // a page of slack: room to start the tensor at any 64-byte offset within a page
  const size_t bytes = (nbytes + kAlignment - 1) / kAlignment * kAlignment + kPage;
  void* p = acquire(bytes);
  const size_t offset = apart_from.size() ? placement(reinterpret_cast<uintptr_t>(p), apart_from, period) : 0;
  at::Tensor t = at::from_blob(static_cast<char*>(p) + offset, sizes, [p, bytes](void*) { release(p, bytes); },
                               options);
  if (at::globalContext().deterministicAlgorithms() && at::globalContext().deterministicFillUninitializedMemory() &&
      t.is_floating_point()) {
    at::fill_(t, std::numeric_limits<double>::quiet_NaN());  // as at::empty does: unwritten elements show up
  }
  return t;
}

size_t cached_output_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.cached_bytes;
}

int64_t cached_output_bytes_op() {
  return static_cast<int64_t>(cached_output_bytes());
}

TORCH_LIBRARY_FRAGMENT(lessons_kernels, m) {
  // Bytes of freed kernel outputs kept for reuse (csrc/output_buffers.h).
  m.def("cached_output_bytes() -> int", &cached_output_bytes_op);
}

}  // namespace lessons_kernels
