"""Communicators: the collectives of a group of processes (ranks), over MPI and NCCL.

A `Communicator` is what every rank holds to talk to the others: `~Communicator.allreduce`
and `~Communicator.broadcast` of arrays in place, `~Communicator.broadcast_object` and
`~Communicator.allgather_object` of picklable Python objects, `~Communicator.barrier` and
`~Communicator.abort`. Every call is *collective*: each rank makes the same calls in the same
order, or the job hangs.

* `SingleProcess`: one rank; every collective is a no-op, so the same script runs without MPI.
* `MPICommunicator`: over an mpi4py communicator. NumPy arrays travel through MPI by buffer
  (no pickling); CuPy arrays through NCCL (`diagnet.distributed.nccl`), on the current CUDA
  stream, never staged on the host.

`init` picks one: an `MPICommunicator` over ``COMM_WORLD`` when an MPI launcher started this
process (``mpiexec -n 2 python script.py``), else `SingleProcess`. mpi4py is imported only
then, so a plain run never loads MPI.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
import warnings

import numpy as np

from .. import backend
from .nccl import NcclChannel

__all__ = ["Communicator", "SingleProcess", "MPICommunicator", "OPS", "REDUCE_DTYPES",
           "LAUNCHER_VARIABLES", "launched_by_mpi", "init", "world", "rank", "world_size",
           "is_main", "barrier", "broadcast", "allreduce", "main_first", "agree",
           "LOCAL_RANK_VARIABLES", "local_rank", "use_local_gpu", "checked_comm"]

#: the reductions of `Communicator.allreduce`
OPS = ("sum", "max", "min")
#: the dtypes `Communicator.allreduce` reduces (MPI and NCCL both have them);
#: `Communicator.broadcast` moves any numeric dtype, as bytes
REDUCE_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.float64, np.int32, np.int64))
#: environment variables that MPI launchers set in the processes they start: MPICH's hydra
#: (PMI_RANK, PMI_SIZE, MPI_LOCALNRANKS), Open MPI (OMPI_COMM_WORLD_SIZE) and PMIx (PMIX_RANK)
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK",
                      "MPI_LOCALNRANKS")
_INSTALL_HINT = 'pip install "diagnet[distributed]"'
#: seconds an aborting rank waits after flushing its output: the launcher forwards a rank's
#: output through a pipe, and an abort that tears the job down at once can lose the report
#: that says why
ABORT_GRACE_S = 0.5


def launched_by_mpi(environ=None) -> bool:
    """Whether an MPI launcher (``mpiexec``, ``mpirun``, ``srun``) started this process, read
    from ``environ`` (default ``os.environ``): any of `LAUNCHER_VARIABLES` is set."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in LAUNCHER_VARIABLES)


# ----------------------------------------------------------------------------- argument checks


def _check_array(array, what: str, *, reduce: bool):
    """Refuse what a collective cannot move in place: not an array, not C-contiguous, read-only,
    or a dtype it does not handle. Only attributes are read (this runs on every step)."""
    if not backend.is_array(array):
        raise TypeError(f"{what}: array must be a NumPy or CuPy array; got "
                        f"{type(array).__name__} (pass a Tensor's .data)")
    if not array.flags.c_contiguous:
        raise ValueError(f"{what}: array must be C-contiguous (it is reduced in place through "
                         f"its buffer); got one of shape {array.shape} with strides "
                         f"{array.strides}: pass a contiguous array and copy the result back")
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        raise ValueError(f"{what}: array must be writeable (it is overwritten in place); got a "
                         f"read-only array")
    if reduce and array.dtype not in REDUCE_DTYPES:
        raise TypeError(f"{what}: array dtype must be one of "
                        f"{', '.join(map(str, REDUCE_DTYPES))}; got {array.dtype}")
    if array.dtype.kind not in "biufc":
        raise TypeError(f"{what}: array dtype must be numeric or bool; got {array.dtype}")


def _check_op(op) -> str:
    if not isinstance(op, str) or op not in OPS:
        raise ValueError(f"allreduce: op must be one of {', '.join(map(repr, OPS))}; got {op!r}")
    return op


def _check_root(root, size: int, what: str) -> int:
    if isinstance(root, bool) or not isinstance(root, (int, np.integer)) \
            or not 0 <= root < size:
        raise ValueError(f"{what}: root must be a rank in [0, {size}); got {root!r}")
    return int(root)


def _check_tag(tag) -> str:
    if not isinstance(tag, str):
        raise TypeError(f"tag must be a str; got {type(tag).__name__} {tag!r}")
    return tag


# ----------------------------------------------------------------------------- communicators


class Communicator:
    """The collectives of a group of processes (ranks); every method is collective: every rank
    calls it, in the same order.

    Attributes: ``rank`` (0 to ``size - 1``), ``size`` (the number of ranks), `is_main`
    (rank 0), ``bytes_moved`` (tag -> the bytes of the arrays passed to `allreduce` and
    `broadcast` with that tag: ``array.nbytes`` per call, counted on every rank, also for one
    rank). Subclasses move the data in ``_allreduce`` / ``_broadcast``; the checks and the
    counting are here, so every communicator refuses the same calls.
    """

    rank = 0
    size = 1

    def __init__(self):
        self.bytes_moved = {}

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes files and prints."""
        return self.rank == 0

    def allreduce(self, array, op="sum", tag="other"):
        """Reduce ``array`` across ranks in place and return it.

        ``array``: a C-contiguous NumPy or CuPy array of a dtype in `REDUCE_DTYPES` (float32,
        float64, int32, int64), of the same shape and dtype on every rank; ``op``: "sum",
        "max" or "min"; ``tag``: the key of `bytes_moved` it is counted under. NumPy arrays
        go through MPI (``Allreduce`` with ``IN_PLACE``), CuPy arrays through NCCL on the
        current stream (never staged on the host). With one rank the array is returned
        unchanged (its bytes are still counted).
        """
        _check_array(array, "allreduce", reduce=True)
        op = _check_op(op)
        self._count(_check_tag(tag), array)
        self._allreduce(array, op)
        return array

    def broadcast(self, array, root=0, tag="other"):
        """Overwrite ``array`` on every rank with root's, in place; returns it.

        ``array``: a C-contiguous NumPy or CuPy array of any numeric or bool dtype (moved as
        bytes), of the same shape and dtype on every rank; ``root``: the rank whose values
        win; ``tag`` as in `allreduce`.
        """
        _check_array(array, "broadcast", reduce=False)
        root = _check_root(root, self.size, "broadcast")
        self._count(_check_tag(tag), array)
        self._broadcast(array, root)
        return array

    def _count(self, tag: str, array) -> None:
        self.bytes_moved[tag] = self.bytes_moved.get(tag, 0) + array.nbytes

    def barrier(self) -> None:
        """Return once every rank has called it."""

    def broadcast_object(self, obj, root=0):
        """Root's ``obj`` (any picklable object) on every rank: returned everywhere."""
        _check_root(root, self.size, "broadcast_object")
        return obj

    def allgather_object(self, obj) -> list:
        """Every rank's ``obj`` (picklable), as a list in rank order."""
        return [obj]

    def abort(self, code=1) -> None:
        """End every process of the job now, with exit status ``code`` (no cleanup: for a
        failure that would leave other ranks waiting in a collective)."""
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _allreduce(self, array, op: str) -> None:
        raise NotImplementedError

    def _broadcast(self, array, root: int) -> None:
        raise NotImplementedError

    def __repr__(self):
        return f"<{type(self).__name__} rank {self.rank} of {self.size}>"


class SingleProcess(Communicator):
    """One rank (rank 0 of 1): every collective returns at once and leaves arrays as they
    are, so a script written for many ranks runs unchanged in one process."""

    def _allreduce(self, array, op: str) -> None:
        """Nothing to reduce with."""

    def _broadcast(self, array, root: int) -> None:
        """Nothing to receive."""


class MPICommunicator(Communicator):
    """The ranks of an mpi4py communicator (default ``MPI.COMM_WORLD``).

    NumPy arrays travel by buffer through MPI; CuPy arrays through an NCCL communicator over
    the same ranks, made at the first collective on a CuPy array (rank 0 draws NCCL's unique
    id, `broadcast_object` hands it to the others). Even with one rank (``MPI.COMM_SELF``) the
    arrays go through MPI and NCCL, which checks that path on a machine with one GPU. Every
    rank must pass the same kind of array to a collective: NumPy on one rank and CuPy on
    another waits forever.
    """

    def __init__(self, mpi_comm=None):
        super().__init__()
        MPI = _import_mpi()
        if mpi_comm is None:
            mpi_comm = MPI.COMM_WORLD
        if not isinstance(mpi_comm, MPI.Intracomm):
            raise TypeError(f"mpi_comm must be an mpi4py intracommunicator (such as "
                            f"MPI.COMM_WORLD); got {type(mpi_comm).__name__}")
        self._MPI = MPI
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self.mpi_comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self._nccl = None

    def _channel(self, array):
        """The NCCL channel when ``array`` is a CuPy array (made on first use), else None."""
        if backend.device_of(array) != "cuda":
            return None
        if self._nccl is None:
            self._nccl = NcclChannel(self)
        return self._nccl

    def _allreduce(self, array, op: str) -> None:
        channel = self._channel(array)
        if channel is not None:
            channel.allreduce(array, op)
        else:
            self.mpi_comm.Allreduce(self._MPI.IN_PLACE, array, op=self._ops[op])

    def _broadcast(self, array, root: int) -> None:
        channel = self._channel(array)
        if channel is not None:
            channel.broadcast(array, root)
        else:
            self.mpi_comm.Bcast([array, array.nbytes, self._MPI.BYTE], root=root)

    def barrier(self) -> None:
        self.mpi_comm.Barrier()

    def broadcast_object(self, obj, root=0):
        return self.mpi_comm.bcast(obj, root=_check_root(root, self.size, "broadcast_object"))

    def allgather_object(self, obj) -> list:
        return self.mpi_comm.allgather(obj)

    def abort(self, code=1) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)  # let the launcher forward the report before the teardown
        self.mpi_comm.Abort(code)


def _import_mpi():
    """``mpi4py.MPI``, initialised at the thread level "funneled" when this is the first
    import: numba and BLAS run threads, but only the main thread calls MPI, which is what
    funneled promises (mpi4py's default, "multiple", makes MPICH lock on every call)."""
    if "mpi4py.MPI" not in sys.modules:
        import mpi4py

        mpi4py.rc.thread_level = "funneled"
    from mpi4py import MPI

    return MPI


# ----------------------------------------------------------------------------- the world

_world: Communicator | None = None
_default = SingleProcess()


def init() -> Communicator:
    """Detect the launcher and make the world communicator (idempotent: a second call returns
    the same one).

    Under an MPI launcher (`launched_by_mpi`) with mpi4py importable: an `MPICommunicator`
    over ``COMM_WORLD`` and, for more than one rank, a ``sys.excepthook`` that prints the
    traceback with the rank and aborts the whole job, so that no rank is left waiting in a
    collective (ChainerMN's ``global_except_hook``). Otherwise (no launcher, no mpi4py: a
    warning says how to install it, or one rank): `SingleProcess`, so the same script runs
    everywhere. mpi4py is imported only when a launcher is detected.
    """
    global _world
    if _world is None:
        _world = _make_world()
    return _world


def _make_world() -> Communicator:
    if not launched_by_mpi():
        return SingleProcess()
    try:
        _import_mpi()
    except ImportError as exc:
        warnings.warn(f"an MPI launcher started this process but mpi4py cannot be imported "
                      f"({exc}): running as a single process; {_INSTALL_HINT}", stacklevel=3)
        return SingleProcess()
    comm = MPICommunicator()
    if comm.size == 1:
        return SingleProcess()
    _abort_on_uncaught_exception(comm)
    return comm


def _abort_on_uncaught_exception(comm: Communicator) -> None:
    """Make an uncaught exception on this rank print its traceback (each line prefixed with
    the rank) and abort every rank: the others may be waiting in a collective for this one."""

    def hook(exc_type, exc, tb):
        prefix = f"[rank {comm.rank}/{comm.size}] "
        lines = "".join(traceback.format_exception(exc_type, exc, tb)).splitlines()
        lines.append(f"uncaught {exc_type.__name__}: aborting all {comm.size} ranks")
        sys.stderr.write("".join(prefix + line + "\n" for line in lines))
        comm.abort(1)

    sys.excepthook = hook


def world() -> Communicator:
    """The communicator of `init`; a `SingleProcess` if `init` was not called."""
    return _default if _world is None else _world


def checked_comm(comm) -> Communicator:
    """``comm``, or `world()` for None; TypeError for anything but a `Communicator`."""
    if comm is None:
        return world()
    if not isinstance(comm, Communicator):
        raise TypeError(f"comm must be a Communicator or None; got {type(comm).__name__}")
    return comm


def rank() -> int:
    """This process's rank in `world` (0 for a single process)."""
    return world().rank


def world_size() -> int:
    """The number of ranks of `world` (1 for a single process)."""
    return world().size


def is_main() -> bool:
    """Whether this process is rank 0 of `world`."""
    return world().is_main


#: the variables through which launchers tell a process its rank on its own node
LOCAL_RANK_VARIABLES = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_LOCAL_RANK",
                        "SLURM_LOCALID")


def local_rank(environ=None) -> int:
    """This process's rank among the ranks of its node: the first of
    `LOCAL_RANK_VARIABLES` set in ``environ`` (default ``os.environ``: MPICH's
    ``MPI_LOCALRANKID``, Open MPI's ``OMPI_COMM_WORLD_LOCAL_RANK``, ...), else the rank in
    `world` (all ranks on one node)."""
    environ = os.environ if environ is None else environ
    for name in LOCAL_RANK_VARIABLES:
        if name in environ:
            return int(environ[name])
    return rank()


def use_local_gpu() -> int:
    """Make GPU number `local_rank` the current CUDA device of this process and return it:
    one rank per GPU, which NCCL requires (it refuses two ranks on one device). Call it
    before any CuPy array is made.

    Raises:
        RuntimeError: CuPy or a GPU is missing, or the node has fewer GPUs than ranks.
    """
    cupy = backend.xp_for("cuda")
    count = cupy.cuda.runtime.getDeviceCount()
    index = local_rank()
    if index >= count:
        raise RuntimeError(f"rank {rank()} is local rank {index} of its node, which has "
                           f"{count} GPU(s): start at most {count} rank(s) per node (NCCL "
                           "needs one GPU per rank)")
    cupy.cuda.Device(index).use()
    return index


def barrier() -> None:
    """`Communicator.barrier` on `world`."""
    world().barrier()


def broadcast(array, root=0, tag="other"):
    """`Communicator.broadcast` on `world`: root's ``array`` everywhere, in place."""
    return world().broadcast(array, root=root, tag=tag)


def allreduce(array, op="sum", tag="other"):
    """`Communicator.allreduce` on `world`: ``array`` reduced across ranks, in place."""
    return world().allreduce(array, op=op, tag=tag)


# ----------------------------------------------------------------------------- agreement


def _describe(exc: BaseException) -> tuple:
    """A picklable account of ``exc``: (module, qualified name of its type, message)."""
    return type(exc).__module__, type(exc).__qualname__, str(exc)


def _recreate(failure: tuple, failed_rank: int) -> Exception:
    """An exception of the type and message of ``failure`` (from `_describe` on another
    rank), or a RuntimeError naming the rank when that type cannot be made here."""
    module, qualname, message = failure
    note = f" (raised on rank {failed_rank})"
    # Only a type of a module imported here already: a name from another rank never
    # makes this rank import anything.
    exc_type = sys.modules.get(module)
    for part in qualname.split("."):
        exc_type = getattr(exc_type, part, None)
    if isinstance(exc_type, type) and issubclass(exc_type, Exception):
        with contextlib.suppress(Exception):
            return exc_type(message + note)
    return RuntimeError(f"rank {failed_rank} failed: {qualname}: {message}")


def agree(fn, comm=None):
    """Run ``fn()`` on every rank; if it raised on any rank, raise on every rank.

    The lowest failing rank's exception is raised: on that rank the original, on the others
    one of the same type and message (with "raised on rank r" added), or a RuntimeError
    naming the rank where the type cannot be re-created. Otherwise returns ``fn()``'s result
    on this rank. For refusals that must stop all ranks at the same point (an existing
    output folder, a resume check). ``comm``: default `world`.
    """
    comm = world() if comm is None else comm
    error = None
    try:
        result = fn()
    except Exception as exc:
        error = exc
    failures = comm.allgather_object(None if error is None else _describe(error))
    failed = [r for r, failure in enumerate(failures) if failure is not None]
    if not failed:
        return result
    if failed[0] == comm.rank:
        raise error
    raise _recreate(failures[failed[0]], failed[0])


@contextlib.contextmanager
def main_first(comm=None):
    """Rank 0 runs the body first; the others wait until it is done, then run it (rank 0
    downloads MNIST, the others then read the cache). If the body raises on rank 0, the
    others raise too (as `agree` does) instead of running it. ``comm``: default `world`."""
    comm = world() if comm is None else comm
    if comm.is_main:
        try:
            yield
        except Exception as exc:
            comm.broadcast_object(_describe(exc))
            raise
        comm.broadcast_object(None)
    else:
        failure = comm.broadcast_object(None)
        if failure is not None:
            raise _recreate(failure, 0)
        yield
