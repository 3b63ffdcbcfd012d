"""The backward walk: gradients propagated from a root tensor to the leaves.

`Tensor.backward` checks its arguments and calls `run_backward`, which pops the graph's
`Function` nodes from a max-heap keyed on ``generation`` (a node runs only after every node
that consumed its outputs), so the walk is iterative and visits each node once. Broadcast
gradients are summed back to their input's shape here (`shapes.sum_to`), intermediate
gradients are freed once passed on, and a node changed in place since it ran refuses to
run (`VersionCounter`). Leaves accumulate through ``Tensor._accumulate_grad``, so this
module works on nodes and arrays and never constructs a tensor.
"""

from __future__ import annotations

import heapq
import itertools

from .. import backend
from .shapes import reduces_to, sum_to
from .version import VersionCounter


def run_backward(root, grad, retain_graph):
    """Propagate ``grad`` from ``root`` to all leaves (iteratively, in topological order)."""
    if root.creator is None:  # backward on a leaf: its gradient is the seed itself
        root._accumulate_grad(grad)
        return
    counter = itertools.count()
    pending = {}  # function -> list of gradient arrays for its outputs
    heap = []

    def push(fn, index, g):
        if fn.freed:
            raise RuntimeError("trying to backward through a graph that was already freed; "
                               "pass retain_graph=True to the first backward() call")
        slot = pending.get(fn)
        if slot is None:
            slot = pending[fn] = [None] * len(fn.output_meta)
            heapq.heappush(heap, (-fn.generation, next(counter), fn))
        slot[index] = g if slot[index] is None else slot[index] + g

    push(root.creator, root._output_index, grad)
    while heap:
        _, _, fn = heapq.heappop(heap)
        grads_out = pending.pop(fn)
        if fn.clock != VersionCounter.clock:  # something was changed in place since fn ran
            _check_versions(fn)
        if len(grads_out) > 1 and any(g is None for g in grads_out):
            # an output nobody used: zero gradient (a single output always has one)
            xp = backend.get_array_module(*[g for g in grads_out if g is not None])
            grads_out = [xp.zeros(shape, dtype) if g is None else g
                         for g, (shape, dtype) in zip(grads_out, fn.output_meta)]
        grads_in = fn.backward(*grads_out)
        if not isinstance(grads_in, tuple):
            grads_in = (grads_in,)
        if len(grads_in) != len(fn.inputs):
            raise RuntimeError(f"{type(fn).__name__}.backward returned {len(grads_in)} "
                               f"gradients for {len(fn.inputs)} inputs")
        for x, gx in zip(fn.inputs, grads_in):
            if gx is None or not x.requires_grad:
                continue
            xa = x.data
            if gx.shape != xa.shape:
                if not reduces_to(gx.shape, xa.shape):
                    _bad_gradient_shape(fn, grads_in, gx)
                gx = sum_to(gx, xa.shape)
            if gx.dtype != xa.dtype:
                gx = gx.astype(xa.dtype)
            if x.creator is None:
                x._accumulate_grad(gx)
            else:
                push(x.creator, x._output_index, gx)
        if not retain_graph:
            fn.release()


def _bad_gradient_shape(fn, grads_in, gx):
    """Raise for the gradient ``gx`` (one of ``grads_in``) that does not fit its input."""
    i = next(i for i, g in enumerate(grads_in) if g is gx)
    raise RuntimeError(
        f"{type(fn).__name__}.backward returned a gradient of shape {gx.shape} for input {i} "
        f"of shape {fn.inputs[i].shape}; a gradient must have its input's shape, or a "
        "broadcast of it (extra leading axes, longer size-1 axes)")


def _check_versions(fn):
    """Raise if an input or output of ``fn`` was changed in place after ``fn`` ran."""
    changed = [f"input {i} (shape {x.shape})" for i, x in enumerate(fn.inputs)
               if x._version is not None and x._version.value > fn.clock]
    if fn.output_version.value > fn.clock and not fn.is_view:
        changed.append("its output")
    if changed:
        name = type(fn).__name__
        raise RuntimeError(
            f"{name}: {' and '.join(changed)} changed in place after {name} ran, and its "
            "backward may need the old values; change tensors in place only after backward() "
            "(as an optimizer step does), or use an out-of-place op or clone()")

