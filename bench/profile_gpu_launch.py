"""Where the time of a small diagonal product goes on the GPU: launch overhead, piece by piece.

    python bench/profile_gpu_launch.py [--out FILE]

On small problems (batch <= 256 at the MNIST/ViT widths) the diagonal kernels finish in a
few microseconds and what a caller waits for is host work: argument checks, allocations,
dtype conversions and the launch itself. This script times each piece alone, back to back
(``N`` calls, one synchronisation at the end, so the time is the host's issue rate unless
the GPU is the bottleneck), at one shape, and prints a Markdown table. Needs CuPy and a GPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import diagnet  # noqa: E402
from diagnet import backend  # noqa: E402
from diagnet.diag import cuda  # noqa: E402
from diagnet.ops.diagonal import DiagLinearFunction  # noqa: E402


def per_call_us(cp, fn, calls=2000, repeats=5):
    """Median over ``repeats`` of (wall time of ``calls`` back-to-back calls) / calls, in µs."""
    fn()
    cp.cuda.get_current_stream().synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        cp.cuda.get_current_stream().synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=768)
    ap.add_argument("--n", type=int, default=768)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed block")
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    cp = backend.cupy_or_none()
    if cp is None:
        sys.exit(f"needs CuPy and a GPU: {backend.cuda_unavailable_reason()}")

    m, n, B = args.m, args.n, args.batch
    W = diagnet.DiagMatrix.random((m, n), sparsity=args.sparsity, rng=0, device="cuda")
    K, L = W.K, W.L
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((B, n)).astype(np.float32))
    dy = cp.asarray(rng.standard_normal((B, m)).astype(np.float32))
    values = W.values
    off64 = W.offsets
    off32 = off64.astype(np.int32)
    dense = cp.asarray(W.to_dense())
    plan = cuda.launch_config("forward", B, m, n, K)
    kernel = cuda._kernel(plan.kernel, np.float32, cuda.DEFAULT_CONFIG)
    out = cp.empty((B, m), np.float32)
    scalars = (np.int32(B), np.int32(m), np.int32(n), np.int32(K))

    xt = diagnet.tensor(x, requires_grad=True)
    vt = diagnet.tensor(values, requires_grad=True)

    def autograd_step():
        y = DiagLinearFunction(off64, (m, n))(xt, vt)
        y.backward(diagnet.Tensor.from_array(dy))
        xt.grad = vt.grad = None

    rows = [
        ("`cp.empty((B, m))`", lambda: cp.empty((B, m), np.float32)),
        ("`cp.ascontiguousarray` of a contiguous array (no-op)", lambda: cp.ascontiguousarray(x)),
        ("offsets int64 -> int32 (`astype`)", lambda: off64.astype(np.int32)),
        ("raw forward kernel launch alone", lambda: kernel(plan.grid, plan.block,
                                                           (x, off32, values, out) + scalars)),
        ("`cuda.forward`, int32 offsets", lambda: cuda.forward(x, off32, values, m)),
        ("`cuda.forward`, int64 offsets", lambda: cuda.forward(x, off64, values, m)),
        ("`cuda.input_grad`, int32 offsets", lambda: cuda.input_grad(dy, off32, values, n)),
        ("`cuda.value_grad`, int32 offsets", lambda: cuda.value_grad(dy, x, off32)),
        ("dense `x @ W.T` (cuBLAS)", lambda: x @ dense.T),
        ("`DiagLinearFunction` forward + backward (autograd)", autograd_step),
    ]
    lines = [f"Shape {m} x {n}, batch {B}, sparsity {args.sparsity} (K = {K}, L = {L}), float32; "
             f"host time per call, back-to-back calls, median of 5 x {args.calls}.", "",
             "| piece | µs per call |", "|---|---|"]
    for name, fn in rows:
        us = per_call_us(cp, fn, calls=args.calls)
        lines.append(f"| {name} | {us:.1f} |")
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
