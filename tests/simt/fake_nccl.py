"""A stand-in for ``cupy.cuda.nccl``: NCCL's calling convention over MPI on host memory.

`simt.fake_cupy.install` registers it as ``cupy.cuda.nccl``, so that diagnet's NCCL path
(`diagnet.distributed.nccl`) runs on the CPU: ``mpiexec -n 2 python -m pytest --fake-cupy``.

What it mirrors from NCCL, because diagnet could get it wrong:

* The calls take what CuPy's binding takes: raw device pointers (``a.data.ptr``), an element
  count, an ``NCCL_*`` type and op constant (NCCL's own values), and a stream pointer. A
  pointer must lie, with all ``count`` elements, inside a live stand-in array (else
  `NcclError`, where real NCCL would read stray memory); its memory is then reached through
  ctypes, as the GPU reaches device memory: never through the array object, and never counted
  as a host transfer (`simt.fake_cupy.host_transfers`).
* A communicator of ``ndev`` ranks is joined with the unique id of one ``get_unique_id()``
  call: every rank must pass the same id (else `NcclError`; real NCCL would hang), and ranks
  must be distinct and in ``[0, ndev)``.

What it does not mirror: asynchrony (calls complete before they return), streams, groups
other than one rank or the whole MPI world, and NCCL's own performance. One rank needs no
MPI; more ranks need the processes of an ``mpiexec`` (mpi4py's ``COMM_WORLD``).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np

available = True

# NCCL's ncclDataType_t and ncclRedOp_t values, as CuPy exports them.
NCCL_INT8 = NCCL_CHAR = 0
NCCL_UINT8 = 1
NCCL_INT32 = NCCL_INT = 2
NCCL_UINT32 = 3
NCCL_INT64 = 4
NCCL_UINT64 = 5
NCCL_FLOAT16 = NCCL_HALF = 6
NCCL_FLOAT32 = NCCL_FLOAT = 7
NCCL_FLOAT64 = NCCL_DOUBLE = 8
NCCL_SUM, NCCL_PROD, NCCL_MAX, NCCL_MIN = 0, 1, 2, 3

_DTYPES = {NCCL_INT8: np.int8, NCCL_UINT8: np.uint8, NCCL_INT32: np.int32,
           NCCL_UINT32: np.uint32, NCCL_INT64: np.int64, NCCL_UINT64: np.uint64,
           NCCL_FLOAT16: np.float16, NCCL_FLOAT32: np.float32, NCCL_FLOAT64: np.float64}
_OPS = ("SUM", "PROD", "MAX", "MIN")  # mpi4py's MPI.<name>, indexed by the NCCL op

#: calls so far, by name ("allReduce", "bcast"), for tests that check the NCCL path ran
calls = {"allReduce": 0, "bcast": 0}


class NcclError(RuntimeError):
    """What CuPy raises for a failed NCCL call."""


def get_version() -> int:
    return 22605  # NCCL 2.26.5, a plausible recent version


def get_unique_id() -> tuple:
    """A fresh id (128 signed bytes, as CuPy returns ncclUniqueId), to share with every rank."""
    return tuple(b - 256 if b > 127 else b for b in os.urandom(128))


class NcclCommunicator:
    """``NcclCommunicator(ndev, commId, rank)``: join the group of ``ndev`` ranks."""

    def __init__(self, ndev: int, commId: tuple, rank: int):
        if not (type(ndev) is int and ndev >= 1 and type(rank) is int and 0 <= rank < ndev):
            raise NcclError(f"ncclInvalidArgument: ndev={ndev!r}, rank={rank!r}")
        if not (isinstance(commId, tuple) and len(commId) == 128):
            raise NcclError("ncclInvalidArgument: commId must be a get_unique_id() result")
        self._mpi = _group(ndev, rank)
        if self._mpi is not None:
            ids = self._mpi.allgather(commId)
            if any(other != commId for other in ids):
                raise NcclError("ncclInvalidUsage: the ranks passed different unique ids (real "
                                "NCCL would wait forever): broadcast rank 0's id")
        self._ndev, self._rank = ndev, rank

    def rank_id(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._ndev

    def allReduce(self, sendbuf: int, recvbuf: int, count: int, datatype: int, op: int,
                  stream: int) -> None:
        """Reduce ``count`` elements at ``sendbuf`` across ranks into ``recvbuf``."""
        _check_call(count, datatype, stream)
        if op not in range(len(_OPS)):
            raise NcclError(f"ncclInvalidArgument: op {op!r}")
        calls["allReduce"] += 1
        recv = _device_memory(recvbuf, count, datatype)
        send = recv if sendbuf == recvbuf else _device_memory(sendbuf, count, datatype)
        if self._mpi is None:
            if send is not recv:
                recv[...] = send
            return
        from mpi4py import MPI

        source = MPI.IN_PLACE if send is recv else send
        self._mpi.Allreduce(source, recv, op=getattr(MPI, _OPS[op]))

    def bcast(self, buff: int, count: int, datatype: int, root: int, stream: int) -> None:
        """Overwrite ``count`` elements at ``buff`` on every rank with root's."""
        _check_call(count, datatype, stream)
        if not (type(root) is int and 0 <= root < self._ndev):
            raise NcclError(f"ncclInvalidArgument: root {root!r} of {self._ndev} ranks")
        calls["bcast"] += 1
        memory = _device_memory(buff, count, datatype)
        if self._mpi is not None:
            self._mpi.Bcast(memory, root=root)

    def destroy(self) -> None:
        """Release the group (nothing to release here)."""


def _group(ndev: int, rank: int):
    """The MPI communicator of a group of ``ndev`` ranks (None for one rank)."""
    if ndev == 1:
        return None
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise NcclError(f"the NCCL stand-in runs {ndev} ranks over mpi4py: {exc}") from exc
    world = MPI.COMM_WORLD
    if (ndev, rank) != (world.Get_size(), world.Get_rank()):
        raise NotImplementedError(f"the NCCL stand-in joins one rank or the whole MPI world "
                                  f"({world.Get_size()} ranks); got ndev={ndev}, rank={rank}")
    return world.Dup()  # its own context: its messages never match diagnet's


def _check_call(count, datatype, stream) -> None:
    if not (type(count) is int and count >= 0):
        raise NcclError(f"ncclInvalidArgument: count must be an int >= 0; got {count!r}")
    if datatype not in _DTYPES:
        raise NcclError(f"ncclInvalidArgument: datatype {datatype!r}")
    if type(stream) is not int:
        raise NcclError(f"stream must be a stream pointer (int, stream.ptr); got "
                        f"{type(stream).__name__}")


def _device_memory(ptr: int, count: int, datatype: int) -> np.ndarray:
    """The ``count`` elements of NCCL type ``datatype`` at device address ``ptr``, as a NumPy
    view of the stand-in's memory, after checking that they lie inside one live array."""
    from . import fake_cupy

    dtype = np.dtype(_DTYPES[datatype])
    nbytes = count * dtype.itemsize
    if nbytes == 0:
        return np.empty(0, dtype)
    if type(ptr) is not int:
        raise NcclError(f"a buffer must be a device pointer (int, a.data.ptr); got "
                        f"{type(ptr).__name__}")
    if not any(start <= ptr and ptr + nbytes <= end for start, end in fake_cupy.live_spans()):
        raise NcclError(f"ncclInvalidArgument: {count} elements of {dtype} at 0x{ptr:x} are "
                        f"not inside a live device array")
    return np.frombuffer((ctypes.c_char * nbytes).from_address(ptr), dtype=dtype)
