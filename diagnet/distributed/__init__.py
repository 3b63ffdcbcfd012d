"""Data-parallel training across processes: MPI for CPUs and setup, NCCL for GPU arrays.

Data parallel here means: every process (a *rank*) holds the whole model, takes its share
of each global batch (``--batch-size`` is the global batch, split across the ranks), computes
its gradients, and the ranks average them (weighted by their sample counts) before every
rank takes the same optimizer step. The ranks start identical (rank 0's model, structure and
optimizer state are broadcast), so they stay identical: a 2-rank run trains the model a
1-process run trains on the same global batch, up to the order of float sums.

The processes talk through a `Communicator` (``comm``):

* MPI through mpi4py starts the processes and carries setup and CPU (NumPy) arrays;
* NCCL through CuPy carries GPU (CuPy) arrays, from GPU memory to GPU memory;
* without a launcher everything is one `SingleProcess` rank, so the same script runs
  everywhere.

Launch with ``mpiexec -n 2 python examples/train_mnist_mlp.py ...`` after
``pip install "diagnet[distributed]"`` (mpi4py and the MPICH wheel); on a cluster,
``mpiexec -n N -hosts a,b python ...`` with one rank per GPU (`use_local_gpu`). A script
that trains with the `diagnet.train.Trainer` needs three lines more than a single-process
one::

    from diagnet import distributed
    from diagnet.data import ArrayDataset, DataLoader, mnist_arrays

    comm = distributed.init()          # MPI world under mpiexec, else a single process
    with distributed.main_first():     # rank 0 downloads, the others then read the cache
        x, y = mnist_arrays("train")
    train = DataLoader(ArrayDataset(x, y), batch_size=128, shuffle=True,   # global batch
                       rank=comm.rank, world_size=comm.size)               # this rank's share
    Trainer(model, optimizer, train, ...).fit()   # averages gradients; rank 0 writes files

Float sums in another order round otherwise, so "up to the order of float sums" is all the
default promises. A loader with a ``micro_batch`` (``DataLoader(..., micro_batch=32)``) makes
the `Trainer` compute each micro-batch's gradient on its own and sum them in one fixed order
(`OrderedGradientSum`, `sum_tap_parts`): the result is then the same bits for any number of
ranks (with the same thread counts per process), for the price of moving one gradient per
micro-batch.

A hand-written loop uses the pieces: `broadcast_state` once, `DistributedOptimizer` (or
`GradientAverager`) every step, `attach_controller` for a sparsity controller, and
``comm.allreduce`` for its metrics.
"""

from .comm import (
    LAUNCHER_VARIABLES, LOCAL_RANK_VARIABLES, OPS, REDUCE_DTYPES, Communicator, MPICommunicator,
    SingleProcess, agree, allreduce, barrier, broadcast, init, is_main, launched_by_mpi,
    local_rank, main_first, rank, use_local_gpu, world, world_size,
)

# Gradient averaging and state synchronisation (gradients.py, sync.py) are exported below.
from .gradients import DistributedOptimizer, GradientAverager, OrderedGradientSum, ordered_sum
from .sync import attach_controller, broadcast_state, check_structure, sum_tap_parts
