"""Fused ops: what a transformer block does in several array passes, done in one.

Each op follows the pattern of the diagonal layer (`diagnet.diag`): one module with the
readable reference, composed of NumPy/CuPy array operations (``xp``), and the dispatch that
picks an implementation by the device of the array; a compiled CPU kernel (numba) beside it;
a CUDA kernel in ``kernels/<op>.cu`` launched through `diagnet.cuda_launch`. The tests check
the kernels against the reference. ``DIAGNET_CPU_KERNELS=reference`` runs the reference on
the CPU instead of the numba kernels (for debugging, or where numba is unavailable).

* `layer_norm`: forward and backward of layer normalisation, one pass over each row
  (``layer_norm_cpu``, ``layer_norm_cuda``, ``kernels/layer_norm.cu``).
* `gelu`: GELU (erf and tanh forms) forward and backward, one pass over a flat array
  (numba; the reference and the CuPy path are `diagnet.ops.activation.GELU`).
* `relu`: bias + ReLU after a linear layer, forward and backward, one pass over each row
  (numba; the reference and the dispatch are `diagnet.ops.activation.BiasReLU`; the CUDA
  kernels are the ReLU variants of the bias kernels in ``gelu_cuda``, ``kernels/gelu.cu``).
* `softmax`: softmax, log-softmax and softmax cross-entropy, one compiled call each way
  (numba; the references and the CuPy path are in `diagnet.ops.activation` and
  `diagnet.ops.loss`).
* `attention`: scaled dot-product attention forward and backward, all in numba (opt-in with
  ``DIAGNET_ATTENTION_KERNELS=numba``: it is not faster than NumPy's batched matmuls at a
  ViT's sizes). The CPU default composes those matmuls with the row softmax of `softmax`;
  the reference, the dispatch and the CuPy path are `diagnet.ops.attention`.
* `fastmath`: vectorisable exponentials for float32 results: one computed in float64
  registers (`exp_nonpositive_f32`), one in float32 registers (`exp_f32`).

The differentiable ops built on them live in `diagnet.ops`.
"""
