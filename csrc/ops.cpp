// The operator schemas: torch.ops.lessons_kernels.<name>. Each <op>_forward and <op>_backward has a
// CPU kernel (csrc/<op>.cpp) and, when compiled for CUDA, a CUDA one (csrc/cuda/<op>.cu); the
// dispatcher picks by the device of the inputs. The ops without a suffix (bias_gelu, ...) are the
// differentiable ones: their autograd (csrc/autograd.cpp) runs the forward kernel and records the
// backward one. Python calls them through lessons_pkg/kernels/ops.py, which checks the arguments.
#include <torch/library.h>

TORCH_LIBRARY(lessons_kernels, m) {
  // Differentiable: forward kernel now, backward kernel in loss.backward() (csrc/autograd.cpp).
  m.def("bias_gelu(Tensor x, Tensor bias) -> Tensor");
  m.def("scaled_masked_softmax(Tensor x, Tensor? mask, int heads, float scale) -> Tensor");
  m.def("scaled_upper_triang_masked_softmax(Tensor x, float scale) -> Tensor");
  m.def("layer_norm(Tensor x, Tensor weight, Tensor bias, float eps) -> Tensor");

  // y = gelu_tanh(x + bias); backward returns (grad_x, grad_bias).
  m.def("bias_gelu_forward(Tensor x, Tensor bias) -> Tensor");
  m.def("bias_gelu_backward(Tensor grad_y, Tensor x, Tensor bias) -> (Tensor, Tensor)");

  // p = softmax(scale * x + mask) per row of x [n, sq, sk]; mask [mb, msq, sk]
  // (bool: true ignores a key; floating: added), slice n / heads of it used by x[n].
  m.def("scaled_masked_softmax_forward(Tensor x, Tensor? mask, int heads, float scale) -> Tensor");
  // Causal: x [n, sq, sq], key j > query i ignored.
  m.def("scaled_upper_triang_masked_softmax_forward(Tensor x, float scale) -> Tensor");
  // grad_x = scale * p * (grad_p - sum(grad_p * p)); the causal one skips the zeros above the diagonal.
  m.def("scaled_softmax_backward(Tensor grad_p, Tensor probs, float scale) -> Tensor");
  m.def("scaled_upper_triang_masked_softmax_backward(Tensor grad_p, Tensor probs, float scale) -> Tensor");

  // LayerNorm over the last dim; forward returns (y, mean, rstd), backward (grad_x, grad_weight, grad_bias).
  m.def("layer_norm_forward(Tensor x, Tensor weight, Tensor bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor weight) -> (Tensor, Tensor, Tensor)");
}
