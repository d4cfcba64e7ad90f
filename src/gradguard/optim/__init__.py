"""gradguard.optim: the optimizer family, drop-in for torch.optim.

Every class is a :class:`torch.optim.Optimizer` with torch's argument names,
defaults and state-dict layout where torch has the algorithm, one ``impl=``
choice (``"auto"``, ``"reference"``, ``"foreach"``, ``"fused"``) and a
``state_dtype=`` for low-precision parameters. No I/O, no logging.
"""

from . import registry
from .adadelta import Adadelta
from .adagrad import Adagrad
from .adam import Adam, AdamW
from .adamax import Adamax
from .base import IMPLS, Optimizer
from .ftrl import FTRL
from .lars import LARS
from .lion import Lion
from .nadam import NAdam
from .registry import available, create
from .rmsprop import RMSprop
from .sgd import SGD

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
    "Lion",
    "NAdam",
    "Optimizer",
    "RMSprop",
    "available",
    "create",
    "registry",
]

for _cls in (SGD, Adagrad, RMSprop, Adadelta, Adam, AdamW, Adamax, NAdam, Lion, LARS, FTRL):
    registry.register(_cls.__name__.lower(), _cls)
