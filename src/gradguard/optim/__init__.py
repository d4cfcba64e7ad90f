"""gradguard.optim: the optimizer family, drop-in for torch.optim.

Every class is a :class:`torch.optim.Optimizer` with torch's argument names,
defaults and state-dict layout where torch has the algorithm, one ``impl=``
choice (``"auto"``, ``"reference"``, ``"foreach"``, ``"fused"``) and a
``state_dtype=`` for low-precision parameters. No I/O, no logging.

The registry (:func:`create`, :func:`available`) holds the mini-batch
optimizers, which step on dense gradients without a closure. Sparse-only
:class:`SparseAdam`, the per-group :class:`Hybrid` and the closure-based
full-batch methods (:class:`GradientDescent`, :class:`NonlinearCG`,
:class:`Newton`) are imported by class.
"""

from . import registry
from .adadelta import Adadelta
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .base import IMPLS, Optimizer
from .cg import NonlinearCG
from .ftrl import FTRL
from .hybrid import Hybrid, ParameterSplit, split_parameters
from .lars import LARS
from .linesearch import GradientDescent
from .lion import Lion
from .nadam import NAdam
from .newton import Newton
from .registry import available, create
from .rmsprop import RMSprop
from .rowwise import RowWiseAdagrad
from .sgd import SGD
from .sparse_adam import SparseAdam

__all__ = [
    "FTRL",
    "IMPLS",
    "LARS",
    "SGD",
    "Adadelta",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "GradientDescent",
    "Hybrid",
    "Lion",
    "NAdam",
    "Newton",
    "NonlinearCG",
    "Optimizer",
    "ParameterSplit",
    "RMSprop",
    "RowWiseAdagrad",
    "SparseAdam",
    "available",
    "create",
    "registry",
    "split_parameters",
]

for _name, _cls in {
    "sgd": SGD,
    "adagrad": Adagrad,
    "rowwise_adagrad": RowWiseAdagrad,
    "rmsprop": RMSprop,
    "adadelta": Adadelta,
    "adam": Adam,
    "adamw": AdamW,
    "adamax": Adamax,
    "nadam": NAdam,
    "lion": Lion,
    "lars": LARS,
    "ftrl": FTRL,
}.items():
    registry.register(_name, _cls)
