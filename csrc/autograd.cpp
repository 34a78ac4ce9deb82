// Autograd for the fused ops: each is one forward kernel and one backward kernel, with only
// what the backward kernel reads saved in between.
//
//   torch.ops.lessons_kernels.layer_norm(x, weight, bias, eps)      (and bias_gelu, the two softmaxes)
//     -> the Autograd kernel below: LayerNorm::apply records a graph node, then calls
//        lessons_kernels::layer_norm_forward, which the dispatcher sends to the CPU or CUDA kernel;
//     <- loss.backward() calls LayerNorm::backward: lessons_kernels::layer_norm_backward.
//
// This is a torch::autograd::Function, PyTorch's pattern for C++ operators, rather than a Python
// torch.autograd.Function, which does the same with more interpreter work per call: at the
// course's LayerNorm shape (2048 x 256, forward + backward 0.3 ms) the Python class cost about
// 30 us more per call (docs/benchmarks.md). lessons_pkg/kernels/ops.py checks the arguments
// (errors that name the values) and calls these ops; reference.py has the same maths in PyTorch.
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace lessons_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;

// The backward kernels are not differentiable themselves: backward(create_graph=True) (grad mode on
// during backward) would give a graph without them, a silently wrong second derivative; refuse it.
void no_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "lessons_kernels::", op,
              ": no double backward (create_graph=True): its backward kernel is not differentiable; use the "
              "plain PyTorch version in lessons_pkg.kernels.reference for higher derivatives");
}

// The typed handle of lessons_kernels::<name> (looked up once per call site: a static).
template <typename Signature>
c10::TypedOperatorHandle<Signature> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// y = gelu_tanh(x + bias)
//   forward:  reads x and bias, writes y (x + bias is never stored); saves x and bias.
//   backward: reads grad_y and x, writes grad_x; grad_bias (the sum of grad_x over rows) in the same pass.
struct BiasGeLU : torch::autograd::Function<BiasGeLU> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& bias) {
    static auto op = kernel<Tensor(const Tensor&, const Tensor&)>("lessons_kernels::bias_gelu_forward");
    ctx->save_for_backward({x, bias});
    return op.call(x, bias);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    static auto op = kernel<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&)>(
        "lessons_kernels::bias_gelu_backward");
    no_double_backward("bias_gelu");
    const variable_list saved = ctx->get_saved_variables();
    auto [grad_x, grad_bias] = op.call(grad_out[0].contiguous(), saved[0], saved[1]);
    return {grad_x, grad_bias};
  }
};

// p = softmax(scale * x + mask) over the last dim, x [n, sq, sk], the mask slice shared by `heads`
// consecutive slices of x (a fully masked row gives 0).
//   forward:  reads x (and the mask), writes p; saves only p.
//   backward: reads grad_p and p, writes grad_x = scale * p * (grad_p - sum(grad_p * p)).
//             The mask, heads and scale are constants: no gradient.
struct ScaledMaskedSoftmax : torch::autograd::Function<ScaledMaskedSoftmax> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const std::optional<Tensor>& mask, int64_t heads,
                        double scale) {
    static auto op = kernel<Tensor(const Tensor&, const std::optional<Tensor>&, int64_t, double)>(
        "lessons_kernels::scaled_masked_softmax_forward");
    Tensor probs = op.call(x, mask, heads, scale);
    ctx->save_for_backward({probs});
    ctx->saved_data["scale"] = scale;
    return probs;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    static auto op = kernel<Tensor(const Tensor&, const Tensor&, double)>("lessons_kernels::scaled_softmax_backward");
    no_double_backward("scaled_masked_softmax");
    Tensor grad_x = op.call(grad_out[0].contiguous(), ctx->get_saved_variables()[0],
                            ctx->saved_data["scale"].toDouble());
    return {grad_x, Tensor(), Tensor(), Tensor()};
  }
};

// Causal p = softmax(scale * x), x [b*heads, sq, sq]: key j > query i ignored.
//   forward:  reads only the j <= i triangle of x, writes all of p (zeros above the diagonal); saves p.
//   backward: the softmax backward above, over the j <= i triangle of grad_p and p only.
struct ScaledUpperTriangMaskedSoftmax : torch::autograd::Function<ScaledUpperTriangMaskedSoftmax> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, double scale) {
    static auto op =
        kernel<Tensor(const Tensor&, double)>("lessons_kernels::scaled_upper_triang_masked_softmax_forward");
    Tensor probs = op.call(x, scale);
    ctx->save_for_backward({probs});
    ctx->saved_data["scale"] = scale;
    return probs;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    static auto op = kernel<Tensor(const Tensor&, const Tensor&, double)>(
        "lessons_kernels::scaled_upper_triang_masked_softmax_backward");
    no_double_backward("scaled_upper_triang_masked_softmax");
    Tensor grad_x = op.call(grad_out[0].contiguous(), ctx->get_saved_variables()[0],
                            ctx->saved_data["scale"].toDouble());
    return {grad_x, Tensor()};
  }
};

// y = (x - mean) * rstd * weight + bias over the last dim, statistics in float32.
//   forward:  reads x, weight, bias; writes y and the per-row mean and rstd; saves x, mean, rstd, weight.
//   backward: reads grad_y, x, mean, rstd, weight; writes grad_x = rstd * (g - mean(g) - xhat * mean(g * xhat))
//             with g = grad_y * weight, and sums grad_weight = sum(grad_y * xhat), grad_bias = sum(grad_y)
//             over the rows in the same kernel.
struct LayerNorm : torch::autograd::Function<LayerNorm> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
    static auto op = kernel<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double)>(
        "lessons_kernels::layer_norm_forward");
    auto [y, mean, rstd] = op.call(x, weight, bias, eps);
    ctx->save_for_backward({x, mean, rstd, weight});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    static auto op = kernel<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                               const Tensor&, const Tensor&)>(
        "lessons_kernels::layer_norm_backward");
    no_double_backward("layer_norm");
    const variable_list s = ctx->get_saved_variables();
    auto [grad_x, grad_weight, grad_bias] = op.call(grad_out[0].contiguous(), s[0], s[1], s[2], s[3]);
    return {grad_x, grad_weight, grad_bias, Tensor()};
  }
};

Tensor bias_gelu(const Tensor& x, const Tensor& bias) { return BiasGeLU::apply(x, bias); }

Tensor scaled_masked_softmax(const Tensor& x, const std::optional<Tensor>& mask, int64_t heads, double scale) {
  return ScaledMaskedSoftmax::apply(x, mask, heads, scale);
}

Tensor scaled_upper_triang_masked_softmax(const Tensor& x, double scale) {
  return ScaledUpperTriangMaskedSoftmax::apply(x, scale);
}

Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps) {
  return LayerNorm::apply(x, weight, bias, eps);
}

// With autograd (the usual case, also under torch.no_grad, which records nothing): the Functions above.
// Without it (inference mode, or dispatch below autograd): the same functions, which then run only
// the forward kernel. Either way the forward kernel is picked by the device of x.
void register_differentiable(torch::Library& m) {
  m.impl("bias_gelu", &bias_gelu);
  m.impl("scaled_masked_softmax", &scaled_masked_softmax);
  m.impl("scaled_upper_triang_masked_softmax", &scaled_upper_triang_masked_softmax);
  m.impl("layer_norm", &layer_norm);
}

}  // namespace

TORCH_LIBRARY_IMPL(lessons_kernels, Autograd, m) { register_differentiable(m); }
TORCH_LIBRARY_IMPL(lessons_kernels, CompositeExplicitAutograd, m) { register_differentiable(m); }

}  // namespace lessons_kernels
