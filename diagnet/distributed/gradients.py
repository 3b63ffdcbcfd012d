"""Averaging gradients across ranks: the one collective of an ordinary data-parallel step.

Every rank holds the same parameters and runs forward and backward on its share of the
global batch: ``b_r`` of the ``B`` samples. If rank ``r``'s loss is the mean over its own
samples, the gradient of the mean loss over the global batch is ``sum_r (b_r / B) * g_r``:
each rank multiplies its gradients by its *weight* ``b_r / B`` and the ranks sum them. With
equal shares the weight is ``1 / size``, a plain mean.

A collective costs a fixed latency plus the time to move its bytes, and a sparse model has
many small parameters (a diagonal layer's ``K x L`` values and its bias). So instead of one
allreduce per parameter, `GradientAverager` copies the gradients into a few flat *buckets*
(one dtype and device each, at most ``bucket_bytes`` long) and reduces each bucket once, as
Horovod's tensor fusion and PyTorch's DDP buckets do. Only what a layer stores is moved: a
diagonal layer's gradient is already ``(K, L)``, never a dense ``(m, n)``.

The buckets are allocated once and kept while the parameters keep their shapes; a layer that
changes its structure (`DiagLinear.set_offsets`, a DynaDiag freeze) changes a shape, and the
next reduce lays the buckets out again. Every rank must lay them out identically (the same
parameters, in the same order, with the same shapes): a new layout is compared across ranks
once, when it is made, so models that differ fail with a message instead of a garbled sum.
"""

from __future__ import annotations

from .. import backend, checks
from ..autograd import Tensor
from ..config import enable_grad
from ..optim import optimizer_params
from .comm import checked_comm

__all__ = ["GradientAverager", "OrderedGradientSum", "DistributedOptimizer"]

#: the default largest bucket: small enough that buckets can be reduced while others are
#: packed on a machine that overlaps them, large enough that latency does not dominate
DEFAULT_BUCKET_BYTES = 4 * 2 ** 20


class _Bucket:
    """One flat gradient buffer and the ``(param, start, stop)`` slot of each parameter."""

    def __init__(self, params, dtype, device):
        self.slots, start = [], 0
        for param in params:
            self.slots.append((param, start, start + param.size))
            start += param.size
        self.buffer = backend.xp_for(device).empty(start, dtype=dtype)

    def pack(self, weight, out=None):
        """Copy every parameter's gradient (zeros for None) in, times ``weight``; into
        ``out`` (an array of the buffer's size) instead of the buffer when given."""
        buffer = self.buffer if out is None else out
        for param, start, stop in self.slots:
            if param.grad is None:
                buffer[start:stop] = 0
            else:
                buffer[start:stop] = param.grad.data.reshape(-1)
        if weight != 1:
            buffer *= weight

    def unpack(self):
        """Give every parameter its reduced gradient (a copy: the buffer is reused)."""
        for param, start, stop in self.slots:
            values = self.buffer[start:stop].reshape(param.shape).copy()
            param.grad = Tensor.from_array(values)


def _describe(array) -> str:
    return f"shape {tuple(array.shape)}, dtype {array.dtype} on {backend.device_of(array)}"


def _check_grad(param, index):
    """Refuse a gradient that cannot stand for ``param``'s (attribute checks only)."""
    grad = param.grad
    if grad is None:
        return
    if not isinstance(grad, Tensor):
        raise TypeError(f"the gradient of params[{index}] must be a Tensor or None; got "
                        f"{type(grad).__name__}")
    g, p = grad.data, param.data
    if type(g) is not type(p) or g.shape != p.shape or g.dtype != p.dtype:
        raise ValueError(f"the gradient of params[{index}] has {_describe(g)}; the parameter "
                         f"has {_describe(p)}")


def _checked_params(params) -> list:
    if isinstance(params, Tensor) or isinstance(params, (set, frozenset)):
        raise TypeError(f"params must be a list of Tensors (ordered, the same on every rank); "
                        f"got {type(params).__name__}")
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"params must be a list of Tensors; got {type(params).__name__}") \
            from None
    for index, param in enumerate(params):
        if not isinstance(param, Tensor):
            raise TypeError(f"params[{index}] must be a Tensor; got {type(param).__name__}")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("params holds a Tensor twice; its gradient would be reduced twice")
    return params


class GradientAverager:
    """Average the gradients of ``params`` across the ranks of ``comm``, packed in buckets.

    Args:
        params: the parameters, a list of `Tensor`s in the same order on every rank.
            Parameters with ``requires_grad=False`` (a frozen DynaDiag ``alpha``) are left
            out: no rank trains them.
        comm: the `Communicator`; None for `diagnet.distributed.world()`.
        bucket_bytes: the most bytes a bucket holds (positive int); a parameter larger than
            that gets a bucket of its own.

    `reduce` is collective: every rank calls it at the same point of each step. ``stats``
    counts ``steps`` (reduces), ``bytes`` (gradient bytes passed to allreduce, all reduces),
    ``last_bytes`` and ``buckets`` (of the last reduce).

    Raises:
        TypeError: ``params`` is not a list of Tensors, ``comm`` not a Communicator.
        ValueError: a Tensor appears twice, ``bucket_bytes`` is not a positive int.
    """

    def __init__(self, params, comm=None, bucket_bytes=DEFAULT_BUCKET_BYTES):
        self.params = _checked_params(params)
        self.comm = checked_comm(comm)
        self.bucket_bytes = checks.positive_int("bucket_bytes", bucket_bytes)
        self.stats = {"steps": 0, "bytes": 0, "last_bytes": 0, "buckets": 0}
        self._layout_key = None
        self._buckets = []

    def for_params(self, params):
        """This averager if it holds ``params`` (the same Tensors, in order), else a new one
        of its kind over ``params`` on the same communicator, carrying its byte counts on:
        for an optimizer that gained a parameter group during the run."""
        params = list(params)
        if len(params) == len(self.params) and all(
                a is b for a, b in zip(params, self.params)):
            return self
        fresh = type(self)(params, self.comm, self.bucket_bytes)
        fresh.stats.update(self.stats)
        return fresh

    def reduce(self, weight=None):
        """Replace every trained parameter's ``grad`` by ``sum over ranks of weight * grad``.

        Args:
            weight: this rank's share of the global batch, ``b_r / B``, a number in
                ``[0, 1]``; None for ``1 / size`` (every rank has as many samples).

        A parameter whose ``grad`` is None on this rank contributes zeros and gets the sum.
        The new gradients are fresh arrays on the parameters' devices (CuPy gradients are
        reduced on the GPU, never copied to the host).

        Raises:
            TypeError, ValueError: ``weight`` is not a number in ``[0, 1]``; a gradient is
                not a Tensor or differs from its parameter in shape, dtype or device;
                RuntimeError: the ranks' parameters differ (checked when the layout is made).
                A refused call changes no gradient.
        """
        if weight is None:
            weight = 1.0 / self.comm.size
        else:
            weight = checks.unit_interval("weight", weight, include_one=True)
        for index, param in enumerate(self.params):
            _check_grad(param, index)
        self._update_layout()
        moved = 0
        for bucket in self._buckets:
            bucket.pack(weight)
            self.comm.allreduce(bucket.buffer, op="sum", tag="gradients")
            moved += bucket.buffer.nbytes
        for bucket in self._buckets:
            bucket.unpack()
        self.stats["steps"] += 1
        self.stats["bytes"] += moved
        self.stats["last_bytes"] = moved
        self.stats["buckets"] = len(self._buckets)

    # ------------------------------------------------------------------ the layout
    def _update_layout(self):
        """Lay the buckets out again if the trained parameters (those with
        ``requires_grad``), or one's shape, dtype or device, changed since the last reduce."""
        key = tuple((index, p.shape, p.dtype, type(p.data))
                    for index, p in enumerate(self.params) if p.requires_grad)
        if key == self._layout_key:
            return
        self._check_same_layout(key)
        self._buckets = self._make_buckets([self.params[entry[0]] for entry in key])
        self._layout_key = key

    def _check_same_layout(self, key):
        """RuntimeError on every rank if the ranks would pack different buckets."""
        mine = [(index, shape, str(dtype), backend.device_of(self.params[index].data))
                for index, shape, dtype, _ in key]
        layouts = self.comm.allgather_object(mine)
        for rank, theirs in enumerate(layouts):
            if theirs != mine:
                raise RuntimeError(
                    f"gradient averaging: the trained parameters differ between rank "
                    f"{self.comm.rank} and rank {rank} (index, shape, dtype, device): "
                    f"{_first_difference(mine, theirs)}; every rank must hold the same "
                    "model (use broadcast_state at the start)")

    def _make_buckets(self, trained):
        """Buckets in parameter order, one (dtype, device) each, at most ``bucket_bytes``."""
        groups = {}
        for param in trained:
            groups.setdefault((param.dtype, param.device), []).append(param)
        buckets = []
        for (dtype, device), members in groups.items():
            current, size = [], 0
            for param in members:
                nbytes = param.size * dtype.itemsize
                if current and size + nbytes > self.bucket_bytes:
                    buckets.append(_Bucket(current, dtype, device))
                    current, size = [], 0
                current.append(param)
                size += nbytes
            if current:
                buckets.append(_Bucket(current, dtype, device))
        return buckets


class OrderedGradientSum(GradientAverager):
    """The gradients of the micro-batches of a global batch, summed in micro-batch order,
    whatever the number of ranks that computed them (the `Trainer`'s exact mode).

    Float addition is not associative: ranks that each sum their own micro-batches and then
    allreduce get another rounding than one process summing them all in a row. Here each
    micro-batch's gradients go into a slot of their own (`add`), zeros stay in the slots of
    other ranks' micro-batches, and `finish` allreduces the slots (adding zeros is exact)
    and sums them in slot order on every rank, starting from zeros: the same bits for 1 or
    N ranks. The price is bytes: a step moves ``slots`` times the stored gradients.

    Use per step: ``begin(slots)``; after each micro-batch's backward ``add(slot)``; then
    ``finish()`` (collective). Args as for `GradientAverager` (``bucket_bytes`` bounds a
    bucket's slot); ``stats`` counts the same.
    """

    def __init__(self, params, comm=None, bucket_bytes=DEFAULT_BUCKET_BYTES):
        super().__init__(params, comm, bucket_bytes)
        self._rows, self._slots = None, 0

    def begin(self, slots):
        """Start a global batch of ``slots`` micro-batches (a positive int): every slot zero."""
        slots = checks.positive_int("slots", slots)
        self._update_layout()
        self._rows = [_zeros_like_rows(bucket.buffer, slots) for bucket in self._buckets]
        self._slots = slots

    def add(self, slot):
        """Copy every trained parameter's gradient (zeros for None) into micro-batch
        ``slot``, then set it to None for the next micro-batch's backward."""
        if self._rows is None:
            raise RuntimeError("OrderedGradientSum.add before begin()")
        if not checks.is_integer(slot) or not 0 <= slot < self._slots:
            raise ValueError(f"slot must be an int in [0, {self._slots}); got {slot!r}")
        for index, param in enumerate(self.params):
            _check_grad(param, index)
        for bucket, rows in zip(self._buckets, self._rows):
            bucket.pack(1, out=rows[slot])
        for param in self.params:
            param.grad = None

    def finish(self):
        """Give every trained parameter the sum of the slots' gradients (collective)."""
        if self._rows is None:
            raise RuntimeError("OrderedGradientSum.finish before begin()")
        moved = 0
        for bucket, rows in zip(self._buckets, self._rows):
            ordered_sum(rows, self.comm, tag="gradients", out=bucket.buffer)
            moved += rows.nbytes
            bucket.unpack()
        self._rows = None
        self.stats["steps"] += 1
        self.stats["bytes"] += moved
        self.stats["last_bytes"] = moved
        self.stats["buckets"] = len(self._buckets)


def _zeros_like_rows(buffer, rows):
    """Zeros ``(rows, buffer.size)`` of ``buffer``'s dtype, on its device."""
    xp = backend.get_array_module(buffer)
    return xp.zeros((rows, buffer.size), dtype=buffer.dtype)


def ordered_sum(rows, comm, tag="other", out=None):
    """The sum over the first axis of ``rows`` ``(slots, ...)`` taken in slot order, the
    same bits on every rank and for any number of ranks; into ``out`` (an array of
    ``rows.shape[1:]`` and its dtype, then returned) when given.

    Each rank passes ``rows`` with the slots it computed filled and zeros in the others;
    the slots are allreduced in place (one rank's value plus zeros: exact), then summed
    from zeros in slot order (``((0 + r0) + r1) + ...``; starting from zeros also makes a
    ``-0.0`` slot count as ``+0.0`` on one rank as on several). Collective."""
    comm.allreduce(rows, op="sum", tag=tag)
    if out is None:
        out = backend.get_array_module(rows).zeros(rows.shape[1:], dtype=rows.dtype)
    else:
        out[...] = 0
    for row in rows:
        out += row
    return out


def _first_difference(mine, theirs) -> str:
    for a, b in zip(mine, theirs):
        if a != b:
            return f"{a} here, {b} there"
    return f"{len(mine)} trained parameters here, {len(theirs)} there"


class DistributedOptimizer:
    """An optimizer whose `step` first averages the gradients across ranks (Horovod's
    ``DistributedOptimizer``, ChainerMN's ``create_multi_node_optimizer``).

    Args:
        optimizer: the wrapped `diagnet.optim.Optimizer`, made as for one process.
        comm: the `Communicator`; None for `diagnet.distributed.world()`.
        bucket_bytes: as for `GradientAverager`.

    ``step(weight=None)`` reduces the gradients of every parameter of every param group
    (`GradientAverager.reduce`), then steps the optimizer. Every other attribute and method
    (``zero_grad``, ``param_groups``, ``state``, ``state_dict``, ``load_state_dict``, ...)
    is the wrapped optimizer's; ``averager`` is the `GradientAverager` (its ``stats``).
    A learning-rate scheduler takes the wrapped optimizer: ``StepLR(dist.optimizer, ...)``.
    A parameter group added later (``add_param_group``) is picked up at the next step.
    """

    def __init__(self, optimizer, comm=None, bucket_bytes=DEFAULT_BUCKET_BYTES):
        groups = getattr(optimizer, "param_groups", None)
        if not isinstance(groups, list) or not callable(getattr(optimizer, "step", None)):
            raise TypeError(f"optimizer must be a diagnet optimizer (with param_groups and "
                            f"step); got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.averager = GradientAverager(optimizer_params(optimizer), comm, bucket_bytes)

    def step(self, weight=None, closure=None):
        """Average the gradients (`GradientAverager.reduce` with ``weight``), then step the
        wrapped optimizer. Collective: every rank calls it.

        ``closure`` (optional) re-evaluates the model and returns the loss; it runs with
        gradient recording on, before the gradients are averaged. Returns its loss, or None.
        """
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        self.averager = self.averager.for_params(optimizer_params(self.optimizer))
        self.averager.reduce(weight)
        self.optimizer.step()
        return loss

    def __getattr__(self, name):
        # only reached for names this wrapper does not define
        optimizer = self.__dict__.get("optimizer")
        if optimizer is None:
            raise AttributeError(name)
        return getattr(optimizer, name)

    def __repr__(self):
        return f"DistributedOptimizer({self.optimizer!r})"
