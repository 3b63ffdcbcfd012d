"""Quickstart: a diagonal sparse layer learns a diagonal sparse teacher.

A teacher weight of shape (256, 784) keeps 10% of its diagonals. A student with the same
offsets (the structure is given; dynamic sparse training, which also learns *which*
diagonals to keep, comes later) learns the teacher's values from noisy input/output pairs
with diagnet's autograd and plain gradient descent. Everything runs through the diagonal
kernels: no dense 256 x 784 matrix is formed while training.

    python examples/quickstart.py [--steps 300] [--device cpu|cuda]
"""

import argparse
import time

import numpy as np

import diagnet as dn
import diagnet.functional as F


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=4.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: best available)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    device = dn.backend.resolve_device(args.device)
    rng = np.random.default_rng(args.seed)
    out_features, in_features = 256, 784
    teacher = dn.DiagMatrix.random((out_features, in_features), sparsity=args.sparsity,
                                   rng=args.seed, device=device)
    print(f"device {device}; teacher {teacher.shape}: {teacher.K} of {teacher.P} diagonals, "
          f"realised sparsity {teacher.sparsity:.4f}")

    values = dn.tensor(np.zeros((teacher.K, teacher.L)), dtype="float32", device=device,
                       requires_grad=True)
    bias = dn.tensor(np.zeros(out_features), dtype="float32", device=device, requires_grad=True)

    teacher_t = teacher.T  # a DiagMatrix again, so x @ teacher_t runs the diagonal kernels

    def batch():
        x = rng.standard_normal((args.batch, in_features)).astype(np.float32)
        noise = 0.01 * rng.standard_normal((args.batch, out_features)).astype(np.float32)
        x_t = dn.tensor(x, device=device)
        y = x_t.data @ teacher_t + dn.tensor(noise, device=device).data  # the layer: x @ W.T
        return x_t, dn.tensor(y, device=device)

    start = time.perf_counter()
    for step in range(args.steps + 1):
        x, target = batch()
        pred = F.diag_linear(x, teacher.offsets, values, teacher.shape, bias=bias)
        loss = F.mse_loss(pred, target)
        values.grad = bias.grad = None
        loss.backward()
        with dn.no_grad():
            values.data -= args.lr * values.grad.data
            bias.data -= args.lr * bias.grad.data
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss.item():.6f}")
    seconds = time.perf_counter() - start

    error = float(np.abs(values.numpy() - dn.backend.to_numpy(teacher.values)).max())
    print(f"{args.steps} steps in {seconds:.2f} s; max |student - teacher| = {error:.4f}")


if __name__ == "__main__":
    main()
