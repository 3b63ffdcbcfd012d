"""NCCL collectives on CuPy arrays, for an `MPICommunicator`'s ranks.

NCCL reduces GPU memory directly (over NVLink, PCIe or the network), so a CuPy array never
travels through the host. Its communicator is set up through the MPI ranks: rank 0 draws a
unique id (``nccl.get_unique_id()``), every rank receives it with ``broadcast_object`` and
joins with ``nccl.NcclCommunicator(size, uid, rank)`` (CuPy's binding, `diagnet.backend.nccl`).
NCCL takes raw device pointers, an element count and type, and a CUDA stream: the work is
queued on the current stream like any kernel, and later work on that stream sees the result.

One NCCL rank per GPU: NCCL refuses two ranks on one device, so a job on one machine selects
``cupy.cuda.Device(local_rank).use()`` in each process before the first collective.
"""

from __future__ import annotations

import numpy as np

from .. import backend

__all__ = ["NcclChannel"]


class NcclChannel:
    """The NCCL communicator of the ranks of ``comm`` (a Communicator with
    ``broadcast_object`` and ``allgather_object`` over MPI), on the current CUDA device.

    Collective: every rank of ``comm`` makes it at the same point. The caller has checked the
    arrays (C-contiguous, a dtype NCCL reduces); this class checks the device.
    """

    def __init__(self, comm):
        nccl = _nccl_on_every_rank(comm)
        cp = backend.cupy_or_none()
        uid = nccl.get_unique_id() if comm.rank == 0 else None
        uid = comm.broadcast_object(uid, root=0)
        self._cupy = cp
        self._nccl = nccl
        self.device_id = cp.cuda.Device().id
        self._comm = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        self._dtypes = {np.dtype(np.float32): nccl.NCCL_FLOAT32,
                        np.dtype(np.float64): nccl.NCCL_FLOAT64,
                        np.dtype(np.int32): nccl.NCCL_INT32,
                        np.dtype(np.int64): nccl.NCCL_INT64}
        self._ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}

    def allreduce(self, array, op: str) -> None:
        """Reduce the CuPy ``array`` (float32/float64/int32/int64) in place; ``op`` is "sum",
        "max" or "min"."""
        self._check_device(array)
        ptr = array.data.ptr
        self._comm.allReduce(ptr, ptr, array.size, self._dtypes[array.dtype], self._ops[op],
                             self._stream())

    def broadcast(self, array, root: int) -> None:
        """Overwrite the CuPy ``array`` with root's, in place (any dtype: moved as bytes)."""
        self._check_device(array)
        self._comm.bcast(array.data.ptr, array.nbytes, self._nccl.NCCL_UINT8, root,
                         self._stream())

    def _check_device(self, array) -> None:
        device_id = array.device.id
        if device_id != self.device_id:
            raise ValueError(f"the array is on GPU {device_id}, but this rank's NCCL "
                             f"communicator was made on GPU {self.device_id}: one rank uses "
                             f"one GPU")

    def _stream(self) -> int:
        return self._cupy.cuda.get_current_stream().ptr


def _nccl_on_every_rank(comm):
    """CuPy's NCCL module, or the same RuntimeError on every rank when any rank lacks it (a
    rank that failed alone would leave the others waiting for the unique id)."""
    try:
        nccl, reason = backend.nccl(), None
    except RuntimeError as exc:
        nccl, reason = None, str(exc)
    reasons = comm.allgather_object(reason)
    failed = [r for r, why in enumerate(reasons) if why is not None]
    if failed:
        raise RuntimeError(f"collectives on CuPy arrays need NCCL on every rank; rank "
                           f"{failed[0]}: {reasons[failed[0]]}")
    return nccl
