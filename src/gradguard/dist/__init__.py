"""gradguard.dist: data-parallel training on ``torch.distributed`` that stays consistent.

``torchrun --nproc_per_node N -m gradguard train CONFIG`` trains with
``DistributedDataParallel`` (gloo on the CPU, NCCL on CUDA); the runner wires
these pieces in (``gradguard.run.loop``), and each works in a loop of your own:

* :mod:`~gradguard.dist.env`: join the job ``torchrun`` describes (:func:`setup`);
* :mod:`~gradguard.dist.runtime`: :class:`DataParallel` (DDP, the per-step
  agreement on the loss / non-finite / stop, replica checks, state from rank 0)
  and :class:`RollbackCheckpointer` (the guard's rollback on every rank);
* :mod:`~gradguard.dist.consistency`: bitwise checksums of replicas (F3);
* :mod:`~gradguard.dist.zero`: ``ZeroRedundancyOptimizer`` checkpoints that
  restore onto any world size;
* :mod:`~gradguard.dist.local_sgd`: post-local SGD with torch's model averaging,
  and the replica spread between averagings;
* :mod:`~gradguard.dist.probe`: per-rank gradient norms before the all-reduce (M8);
* :mod:`~gradguard.dist.collectives`: object / state-dict broadcasts and gathers.

See ``docs/distributed.md``.
"""

from .consistency import Checksums, Mismatch, checksums, compare, tensor_checksum
from .env import DistEnv, DistributedSetupError, launched, setup, teardown
from .local_sgd import LocalSGD
from .probe import GradNormProbe
from .runtime import (
    Agreement,
    DataParallel,
    DistributedConfigError,
    RollbackCheckpointer,
    sparse_gradient_modules,
)
from .zero import ConsolidatedState, consolidated_view, load_full_state, make_zero

__all__ = [
    "Agreement",
    "Checksums",
    "ConsolidatedState",
    "DataParallel",
    "DistEnv",
    "DistributedConfigError",
    "DistributedSetupError",
    "GradNormProbe",
    "LocalSGD",
    "Mismatch",
    "RollbackCheckpointer",
    "checksums",
    "compare",
    "consolidated_view",
    "launched",
    "load_full_state",
    "make_zero",
    "setup",
    "sparse_gradient_modules",
    "teardown",
    "tensor_checksum",
]
