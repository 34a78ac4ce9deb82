// Scaled masked softmax and its causal variant on the CPU, forward and backward.
//
//   forward:  p = softmax(scale * x + mask) over each row of length sk
//             reads x (and the mask), writes p
//   backward: gx = scale * p * (gp - sum(gp * p))
//             reads gp, p; writes gx (causal: reads only the j <= i part)
//
// x is [n, sq, sk] (n = batch * heads). The mask is [mb, msq, sk] with mb = 1 or
// n / heads, msq = 1 or sq: x[k] uses mask slice k / heads, so one mask serves
// every head without being copied. Boolean masks: true ignores the key;
// floating masks are added. Causal: key j > query i is ignored, and only the
// j <= i part of each row is read.
//
// A row whose keys are all ignored (max score = -inf) is written as zeros
// (see lessons_pkg/kernels/reference.py), so its gradient is zero too.
//
// One row at a time: scores, maximum, exponentials and their sum stay in the
// output row, which is in L1 cache, so x is read once and p written once.
// Reference: lessons_pkg/kernels/reference.py.
#include <torch/library.h>

#include <vector>

#include "common.h"
#include "output_buffers.h"

namespace lessons_kernels {
namespace {

using at::vec::Vectorized;

// y[0:len] = softmax(scale * x[0:len] + add[0:len]) (add may be null), y[len:sk] = 0.
template <typename T>
void softmax_row(const T* x, const T* add, T* y, int64_t len, int64_t sk, T scale) {
  using Vec = Vectorized<T>;
  const Vec vscale(scale);

  // Pass 1: scores into y, and their maximum.
  const T max_score = row_max<T>(len, [&](int64_t j, int n) {
    Vec s = Vec::loadu(x + j, n) * vscale;
    if (add != nullptr) s = s + Vec::loadu(add + j, n);
    s.store(y + j, n);
    return s;
  });
  if (max_score == -std::numeric_limits<T>::infinity()) {  // every key ignored (or len == 0): the row is zeros
    std::fill(y, y + sk, T(0));
    return;
  }

  // Pass 2: exponentials (in place) and their sum.
  const Vec vrow_max(max_score);
  const T sum = row_sum<T>(len, [&](int64_t j, int n) {
    const Vec e = (Vec::loadu(y + j, n) - vrow_max).exp_u20();
    e.store(y + j, n);
    return e;
  });

  // Pass 3: normalise; the ignored tail (causal) is zero.
  const Vec inv(T(1) / sum);
  row_for_each<T>(len, [&](int64_t j, int n) { (Vec::loadu(y + j, n) * inv).store(y + j, n); });
  std::fill(y + len, y + sk, T(0));
}

// x, y: [n, sq, sk]; mask: [mb, msq, sk] bool (is_bool) or T, or null.
template <typename T>
void masked_forward(const T* x, const void* mask, bool is_bool, T* y, int64_t n, int64_t sq, int64_t sk,
                    int64_t heads, int64_t mb, int64_t msq, T scale) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  at::parallel_for(0, n * sq, rows_per_task(sk), [&](int64_t begin, int64_t end) {
    std::vector<T> additive(is_bool ? sk : 0);  // this task's boolean mask row as 0 / -inf
    for (int64_t r = begin; r < end; ++r) {
      const int64_t k = r / sq, i = r % sq;
      const T* add = nullptr;
      if (mask != nullptr) {
        const int64_t offset = ((mb == 1 ? 0 : k / heads) * msq + (msq == 1 ? 0 : i)) * sk;
        if (is_bool) {
          const bool* m = static_cast<const bool*>(mask) + offset;
          for (int64_t j = 0; j < sk; ++j) additive[j] = m[j] ? neg_inf : T(0);
          add = additive.data();
        } else {
          add = static_cast<const T*>(mask) + offset;
        }
      }
      softmax_row<T>(x + r * sk, add, y + r * sk, sk, sk, scale);
    }
  });
}

// x, y: [n, sq, sq]; row i keeps keys 0..i.
template <typename T>
void causal_forward(const T* x, T* y, int64_t n, int64_t sq, T scale) {
  at::parallel_for(0, n * sq, rows_per_task(sq), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      softmax_row<T>(x + r * sq, nullptr, y + r * sq, r % sq + 1, sq, scale);
    }
  });
}

// grad_y, probs, grad_x: [rows, sk]. Causal (rows of [n, sq, sq]): row i is zero after
// key i in p, hence in grad_x; only its first i + 1 entries are read.
template <typename T>
void softmax_backward(const T* grad_y, const T* probs, T* grad_x, int64_t rows, int64_t sk, T scale, bool causal) {
  using Vec = Vectorized<T>;
  at::parallel_for(0, rows, rows_per_task(sk), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = grad_y + r * sk;
      const T* p = probs + r * sk;
      T* gx = grad_x + r * sk;
      const int64_t len = causal ? r % sk + 1 : sk;
      const Vec dot(row_sum<T>(len, [&](int64_t j, int n) { return Vec::loadu(g + j, n) * Vec::loadu(p + j, n); }));
      const Vec vscale(scale);
      row_for_each<T>(len, [&](int64_t j, int n) {
        (vscale * Vec::loadu(p + j, n) * (Vec::loadu(g + j, n) - dot)).store(gx + j, n);
      });
      std::fill(gx + len, gx + sk, T(0));
    }
  });
}

void check_scores(const at::Tensor& x) {
  LESSONS_CHECK_CPU(x);
  LESSONS_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.dim() >= 2, "softmax: x must be [..., sq, sk], got ", x.sizes());
}

at::Tensor scaled_masked_softmax_forward_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                             int64_t heads, double scale) {
  check_scores(x);
  const int64_t sq = x.size(-2), sk = x.size(-1), n = sq * sk ? x.numel() / (sq * sk) : 0;
  int64_t mb = 1, msq = 1;
  const void* mask_ptr = nullptr;
  const bool is_bool = mask.has_value() && mask->scalar_type() == at::kBool;
  if (mask.has_value()) {
    const at::Tensor& m = *mask;
    LESSONS_CHECK_CPU(m);
    LESSONS_CHECK_CONTIGUOUS(m);
    TORCH_CHECK(m.dim() == 3 && (m.size(1) == 1 || m.size(1) == sq) && m.size(2) == sk,
                "softmax: mask must be [mb, 1 or ", sq, ", ", sk, "], got ", m.sizes());
    TORCH_CHECK(heads >= 1 && (m.size(0) == 1 || m.size(0) * heads == n), "softmax: mask has ", m.size(0),
                " slices; x has ", n, " = slices * heads (", heads, ") rows of [sq, sk] needed");
    TORCH_CHECK(is_bool || m.scalar_type() == x.scalar_type(), "softmax: mask must be bool or ", x.scalar_type(),
                ", got ", m.scalar_type());
    mb = m.size(0);
    msq = m.size(1);
    mask_ptr = m.const_data_ptr();
  }
  at::Tensor y = new_output_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scaled_masked_softmax_forward_cpu", [&] {
    masked_forward<scalar_t>(x.const_data_ptr<scalar_t>(), mask_ptr, is_bool, y.mutable_data_ptr<scalar_t>(), n, sq,
                             sk, heads, mb, msq, static_cast<scalar_t>(scale));
  });
  return y;
}

at::Tensor scaled_upper_triang_masked_softmax_forward_cpu(const at::Tensor& x, double scale) {
  check_scores(x);
  TORCH_CHECK(x.dim() == 3 && x.size(1) == x.size(2), "causal softmax: x must be [n, sq, sq], got ", x.sizes());
  at::Tensor y = new_output_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "scaled_upper_triang_masked_softmax_forward_cpu", [&] {
    causal_forward<scalar_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), x.size(0), x.size(1),
                             static_cast<scalar_t>(scale));
  });
  return y;
}

at::Tensor softmax_backward_cpu(const at::Tensor& grad_y, const at::Tensor& probs, double scale, bool causal) {
  check_scores(probs);
  LESSONS_CHECK_CONTIGUOUS(grad_y);
  TORCH_CHECK(grad_y.sizes() == probs.sizes() && grad_y.scalar_type() == probs.scalar_type(),
              "softmax backward: grad ", grad_y.sizes(), " ", grad_y.scalar_type(), " vs probs ", probs.sizes(), " ",
              probs.scalar_type());
  TORCH_CHECK(!causal || (probs.dim() == 3 && probs.size(1) == probs.size(2)),
              "causal softmax backward: probs must be [n, sq, sq], got ", probs.sizes());
  at::Tensor grad_x = new_output_like(probs);
  const int64_t sk = probs.size(-1), rows = sk ? probs.numel() / sk : 0;
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "softmax_backward_cpu", [&] {
    softmax_backward<scalar_t>(grad_y.const_data_ptr<scalar_t>(), probs.const_data_ptr<scalar_t>(),
                               grad_x.mutable_data_ptr<scalar_t>(), rows, sk, static_cast<scalar_t>(scale), causal);
  });
  return grad_x;
}

at::Tensor scaled_softmax_backward_cpu(const at::Tensor& grad_y, const at::Tensor& probs, double scale) {
  return softmax_backward_cpu(grad_y, probs, scale, /*causal=*/false);
}

at::Tensor scaled_upper_triang_masked_softmax_backward_cpu(const at::Tensor& grad_y, const at::Tensor& probs,
                                                           double scale) {
  return softmax_backward_cpu(grad_y, probs, scale, /*causal=*/true);
}

}  // namespace

TORCH_LIBRARY_IMPL(lessons_kernels, CPU, m) {
  m.impl("scaled_masked_softmax_forward", &scaled_masked_softmax_forward_cpu);
  m.impl("scaled_upper_triang_masked_softmax_forward", &scaled_upper_triang_masked_softmax_forward_cpu);
  m.impl("scaled_softmax_backward", &scaled_softmax_backward_cpu);
  m.impl("scaled_upper_triang_masked_softmax_backward", &scaled_upper_triang_masked_softmax_backward_cpu);
}

}  // namespace lessons_kernels
