"""gradguard.optim: the optimizer family, drop-in for torch.optim.

Every class is a :class:`torch.optim.Optimizer` with torch's argument names,
defaults and state-dict layout where torch has the algorithm, one ``impl=``
choice (``"auto"``, ``"reference"``, ``"foreach"``, ``"fused"``) and a
``state_dtype=`` for low-precision parameters. No I/O, no logging.
"""

from . import registry
from .adam import Adam, AdamW
from .base import IMPLS, Optimizer
from .registry import available, create

__all__ = [
    "IMPLS",
    "Adam",
    "AdamW",
    "Optimizer",
    "available",
    "create",
    "registry",
]

for _name, _cls in {
    "adam": Adam,
    "adamw": AdamW,
}.items():
    registry.register(_name, _cls)
