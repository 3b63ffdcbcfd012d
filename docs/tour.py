"""One training step of a diagonal MLP, walked from the front of the stack to the back.

The runnable companion of `docs/tour.md`: each stop below prints what that stop of the
tour is about, on a network small enough to print (a 6 x 8 diagonal layer, a batch of 4).

    python docs/tour.py    # ~10 s the first time (numba compiles its kernels), ~1 s after

The step is the one `diagnet.train.Trainer` runs (``Trainer._train_step``)::

    controller.before_step(step); loss = loss_fn(model(x), y)
    optimizer.zero_grad(); loss.backward(); optimizer.step(); controller.after_step(step)

taken apart in the order of the tour: the op and the graph node it records (1), the graph
and backward (2), the format of the weight (3), the kernel that runs the op (4), the
optimizer step (5), the dynamic sparse training update that changes the weight's diagonals,
with the optimizer state that follows them (6), and a checkpoint of it all (7).
"""

from __future__ import annotations

import pathlib
import tempfile

import numpy as np

import diagnet as dn
import diagnet.functional as F
from diagnet import nn, optim, settings
from diagnet.diag import dispatch, layout
from diagnet.dst import DiagPruneGrow


def stop(number, title):
    """Print the heading of one stop (the test of this script looks for them)."""
    print(f"\n== {number}. {title}")


def pattern(layer):
    """The layer's weight as rows of characters: the digit ``p % 10`` of the diagonal ``p``
    an entry lies on where the diagonal is stored, ``.`` where it is not."""
    m, n = layer.shape
    rows, cols = np.meshgrid(np.arange(m), np.arange(n), indexing="ij")
    p, _ = layout.diagonal_of(layer.shape, rows, cols)
    stored = np.isin(p, dn.backend.to_numpy(layer.offsets.data))
    return ["".join(str(d % 10) if s else "." for d, s in zip(pr, sr))
            for pr, sr in zip(p, stored)]


def graph_nodes(tensor):
    """The class names of the graph's `Function` nodes, from ``tensor`` back to the leaves,
    breadth first (for a chain, the order in which backward runs them)."""
    names, seen, queue = [], set(), [tensor.creator]
    while queue:
        fn = queue.pop(0)
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        names.append(type(fn).__name__)
        queue.extend(x.creator for x in fn.inputs)
    return names


def build():
    """The input batch, the model, its optimizer and a RigL controller of its diagonal layer."""
    dn.manual_seed(0)
    rng = np.random.default_rng(0)
    x = dn.tensor(rng.standard_normal((4, 8)), dtype="float32")
    labels = dn.tensor(rng.integers(0, 3, 4))
    model = nn.Sequential(nn.DiagLinear(8, 6, sparsity=0.5, rng=0), nn.ReLU(),
                          nn.Linear(6, 3, rng=1))
    opt = optim.Adam(model.parameters(), lr=0.1)
    controller = DiagPruneGrow({"0": model[0]}, method="rigl", delta_t=1, t_end=2, f0=0.5,
                               rng=0)
    print("a diagonal MLP 8 -> 6 -> 3 (DiagLinear, ReLU, Linear), Adam, and RigL updating the "
          "diagonals of its first layer after step 0")
    return x, labels, model, opt, controller


def tensor_and_function(x, diag):
    """Stop 1: one op on tensors records one `Function` node; returns its output."""
    stop(1, "Tensor and Function")
    y = F.diag_linear(x, diag.offsets, diag.values, diag.shape, bias=diag.bias)
    fn = y.creator
    print(f"y = F.diag_linear(x, offsets, values, shape, bias): {y.shape} {y.dtype}, "
          f"requires_grad={y.requires_grad}")
    print(f"y.creator: {type(fn).__name__}, generation {fn.generation}, inputs "
          f"{[tuple(t.shape) for t in fn.inputs]} (x, values, bias)")
    print(f"leaves: x.creator is {x.creator}; diag.values is a {type(diag.values).__name__}, "
          f"is_leaf={diag.values.is_leaf}")
    return y


def backward(x, labels, model, opt, controller):
    """Stop 2: the forward pass of step 0 records a graph; backward walks it."""
    stop(2, "backward")
    controller.before_step(0)  # step 0 updates the diagonals: RigL arms its gradient tap
    loss = F.cross_entropy(model(x), labels)
    print("graph, from the loss back: " + " <- ".join(graph_nodes(loss)))
    print("(_TapGrad: RigL's gradient tap, armed for this step only; see stop 6)")
    opt.zero_grad()
    loss.backward()
    print(f"loss {loss.item():.4f}; gradients: " + ", ".join(
        f"{name} {p.grad.shape}" for name, p in model.named_parameters()))
    print(f"the graph is freed after backward: loss.creator.freed = {loss.creator.freed}")


def diagonal_format(diag):
    """Stop 3: what the layer stores, and which matrix entries that is."""
    stop(3, "the diagonal format")
    offsets = dn.backend.to_numpy(diag.offsets.data)
    print(f"DiagLinear {diag.shape} (out, in): P = {diag.P} diagonals of length L = {diag.L}, "
          f"K = {diag.K} stored: offsets {offsets.tolist()} (a buffer), values "
          f"{diag.values.shape} (the parameter)")
    rows, cols = layout.diagonal_coordinates(diag.shape, offsets[:1])
    print(f"values[0] is diagonal {offsets[0]}: entries "
          + " ".join(f"({r},{c})" for r, c in zip(rows[0], cols[0])))
    print("the weight, each stored entry marked with its diagonal (mod 10):")
    for row in pattern(diag):
        print("    " + row)


def op_to_kernel(x, diag, y):
    """Stop 4: which kernels run the op, and the NumPy reference they agree with."""
    stop(4, "from op to kernel")
    impl = dispatch.implementation(x.data)
    print(f"dispatch.implementation(x.data) -> {impl.__name__} "
          f"(settings.cpu_kernels = {settings.cpu_kernels!r})")
    with settings.override(cpu_kernels="reference"):
        print(f"with settings.override(cpu_kernels='reference') -> "
              f"{dispatch.implementation(x.data).__name__}")
        y_ref = F.diag_linear(x, diag.offsets, diag.values, diag.shape, bias=diag.bias)
    print(f"max |kernel - reference| = {float(np.abs(y.numpy() - y_ref.numpy()).max()):.1e}")


def layers_and_optimizers(diag, opt):
    """Stop 5: the optimizer step, and the per-row state it keeps for ``values``."""
    stop(5, "layers and optimizers")
    before = diag.values.numpy()
    opt.step()
    print("Adam stepped; its state of values: " + ", ".join(
        f"{k} {getattr(v, 'shape', v)}" for k, v in opt.state[diag.values].items()))
    print(f"values moved by at most {float(np.abs(diag.values.numpy() - before).max()):.3f}; "
          f"values.optimizers() = {[type(o).__name__ for o in diag.values.optimizers()]}")


def dst_update(diag, opt, controller):
    """Stop 6: RigL swaps diagonals after step 0; Adam's moments follow the offsets."""
    stop(6, "one DST update")
    offsets = dn.backend.to_numpy(diag.offsets.data).copy()
    old_moment = dn.backend.to_numpy(opt.state[diag.values]["exp_avg"]).copy()
    (ev,) = controller.after_step(0)
    new_offsets = dn.backend.to_numpy(diag.offsets.data)
    print(f"RigL after_step(0): dropped {ev['dropped']}, grown {ev['grown']}; offsets "
          f"{offsets.tolist()} -> {new_offsets.tolist()}")
    moment = dn.backend.to_numpy(opt.state[diag.values]["exp_avg"])
    kept = np.isin(new_offsets, offsets)
    same = np.array_equal(moment[kept], old_moment[np.isin(offsets, new_offsets)])
    print(f"Adam's exp_avg followed set_offsets: kept rows unchanged {same}, grown rows zero "
          f"{bool(np.all(moment[~kept] == 0))}")
    for row in pattern(diag):
        print("    " + row)


def trainer_and_checkpoint(x, model, opt):
    """Stop 7: the model and optimizer saved, and loaded into a model with other diagonals."""
    stop(7, "trainer and checkpoint")
    print("Trainer._train_step runs stops 2, 5 and 6 for every batch, and saves like this:")
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "tour.safetensors"
        dn.save(path, model=model, optimizer=opt, state={"step": 1})
        fresh = nn.Sequential(nn.DiagLinear(8, 6, sparsity=0.5, rng=7), nn.ReLU(),
                              nn.Linear(6, 3, rng=8))
        fresh_opt = optim.Adam(fresh.parameters(), lr=0.1)
        saved = dn.load(path, model=fresh, optimizer=fresh_opt)
        print(f"saved {path.name}: {path.stat().st_size} bytes (offsets and values, no dense "
              f"weight)")
    same_offsets = np.array_equal(dn.backend.to_numpy(fresh[0].offsets.data),
                                  dn.backend.to_numpy(model[0].offsets.data))
    same_out = np.array_equal(fresh(x).numpy(), model(x).numpy())
    print(f"loaded into a model built with other diagonals: state {saved.state}, same offsets "
          f"{same_offsets}, same output {same_out}")


def main():
    x, labels, model, opt, controller = build()
    diag = model[0]
    y = tensor_and_function(x, diag)
    backward(x, labels, model, opt, controller)
    diagonal_format(diag)
    op_to_kernel(x, diag, y)
    layers_and_optimizers(diag, opt)
    dst_update(diag, opt, controller)
    trainer_and_checkpoint(x, model, opt)


if __name__ == "__main__":
    main()
