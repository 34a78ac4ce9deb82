// The cache of freed output buffers: see output_buffers.h.
#include "output_buffers.h"

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/fill.h>
#include <ATen/ops/from_blob.h>
#include <torch/library.h>

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

}  // namespace

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (nbytes < kMinPooledBytes || !options.device().is_cpu()) return at::empty(sizes, options);
  const size_t bytes = (nbytes + kAlignment - 1) / kAlignment * kAlignment;
  void* p = acquire(bytes);
  at::Tensor t = at::from_blob(p, sizes, [bytes](void* q) { release(q, bytes); }, options);
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
