"""Hybrid: several optimizers acting as one, each on its own parameters.

Recommendation and CTR models train their embedding tables with a sparse,
row-wise optimizer and their dense layers with Adam or AdamW. :class:`Hybrid`
puts those optimizers behind one :class:`torch.optim.Optimizer`, so that the
training loop, LR schedulers, ``GradScaler``, step hooks and checkpoints see a
single object; :func:`split_parameters` finds the embedding tables of a model.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
"""Modules whose ``weight`` :func:`split_parameters` counts as an embedding table."""


class ParameterSplit(NamedTuple):
    """A model's trainable parameters: embedding tables and the rest."""

    embeddings: list[nn.Parameter]
    dense: list[nn.Parameter]


def split_parameters(model: nn.Module,
                     embedding_types: Iterable[type[nn.Module]] = EMBEDDING_TYPES,
                     ) -> ParameterSplit:
    """Split ``model``'s trainable parameters into embedding tables and dense parameters.

    The weight of every ``embedding_types`` module (``nn.Embedding``,
    ``nn.EmbeddingBag``) is an embedding; every other parameter with
    ``requires_grad`` is dense. Each parameter appears once, in
    ``model.parameters()`` order; a weight shared between an embedding and another
    module (tied input/output embeddings) counts as an embedding.
    """
    kinds = tuple(embedding_types)
    tables = {id(m.weight) for m in model.modules()
              if isinstance(m, kinds) and isinstance(getattr(m, "weight", None), Tensor)}
    embeddings: list[nn.Parameter] = []
    dense: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (embeddings if id(p) in tables else dense).append(p)
    return ParameterSplit(embeddings, dense)


class Hybrid(torch.optim.Optimizer):
    """Several optimizers, each on its own parameters, used as one optimizer.

    ``Hybrid({"embeddings": RowWiseAdagrad(tables, lr=0.05), "dense": AdamW(rest, lr=1e-3)})``

    * ``step(closure)`` evaluates the closure once, then steps every inner
      optimizer in the given order (their own step hooks run too);
    * ``param_groups`` is the list of the inner optimizers' groups, in order: the
      same dict objects, so an LR scheduler built on the Hybrid (or
      ``GradScaler``, or gradient clipping over ``param_groups``) reaches every
      group, and a group added to an inner optimizer appears here;
    * ``state`` is a read-only merged view of the inner optimizers' state;
    * ``zero_grad``, ``state_dict``/``load_state_dict`` (torch's layout, the
      parameters numbered across all inner optimizers, plus an ``"optimizers"``
      entry listing each optimizer's name and number of groups), step and
      state-dict hooks, pickling and ``copy.deepcopy`` work as on any optimizer.

    A parameter may belong to one inner optimizer only; an overlap is refused at
    construction, naming the parameter's place in both.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("Hybrid needs at least one optimizer, got none")
        for name, optimizer in optimizers.items():
            if not isinstance(name, str):
                raise ValueError(f"Hybrid's optimizers are named by strings, got {name!r}")
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise ValueError(f"Hybrid optimizer {name!r} is a {type(optimizer).__name__}, "
                                 "not a torch.optim.Optimizer")
        _check_disjoint(optimizers)
        self._ready = False
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(optimizers)
        # torch's constructor sets up hooks and step profiling; the groups live in the
        # inner optimizers, so it gets one empty placeholder group, which is dropped.
        super().__init__([{"params": []}], {})
        self._ready = True

    # ------------------------------------------------------------ the groups
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every inner optimizer's param groups, in order (the same dicts)."""
        return [g for optimizer in self.optimizers.values() for g in optimizer.param_groups]

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if self._ready:
            raise AttributeError("Hybrid.param_groups are its optimizers' groups and cannot be "
                                 "replaced; change the groups themselves")

    @property
    def state(self) -> defaultdict[Tensor, Any]:
        """The inner optimizers' state, merged: a new mapping of the same per-parameter dicts."""
        return defaultdict(dict, ((p, s) for optimizer in self.optimizers.values()
                                  for p, s in optimizer.state.items()))

    @state.setter
    def state(self, value: Any) -> None:
        if self._ready:
            raise AttributeError("Hybrid.state is its optimizers' state and cannot be replaced")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer named by the group's ``"optimizer"`` key."""
        if not self._ready:
            return  # torch's constructor adding the placeholder group
        group = dict(param_group)
        name = group.pop("optimizer", None)
        if name not in self.optimizers:
            raise ValueError(
                f"Hybrid.add_param_group needs the group's 'optimizer' key to name one of "
                f"{', '.join(repr(n) for n in self.optimizers)}, got {name!r}")
        params = group["params"]
        group["params"] = [params] if isinstance(params, Tensor) else list(params)
        _check_disjoint({**self.optimizers, "(new group)": _Groups([group])})
        self.optimizers[name].add_param_group(group)

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Evaluate ``closure`` (with grad enabled) if given, then step every optimizer."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers.values():  # bad ids refuse the whole step
            check = getattr(optimizer, "check_sparse_indices", None)
            if check is not None:
                check()
        for optimizer in self.optimizers.values():
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------ state dict
    def state_dict(self) -> dict[str, Any]:
        """torch's layout over all inner optimizers, plus ``"optimizers"``: [[name, groups]]."""
        for pre_hook in getattr(self, "_optimizer_state_dict_pre_hooks", {}).values():
            pre_hook(self)
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        layout: list[list[Any]] = []
        offset = 0
        for name, optimizer in self.optimizers.items():
            inner = optimizer.state_dict()
            state.update({offset + i: s for i, s in inner["state"].items()})
            groups.extend({**g, "params": [offset + i for i in g["params"]]}
                          for g in inner["param_groups"])
            layout.append([name, len(inner["param_groups"])])
            offset += sum(len(g["params"]) for g in inner["param_groups"])
        result: dict[str, Any] = {"state": state, "param_groups": groups, "optimizers": layout}
        for post_hook in getattr(self, "_optimizer_state_dict_post_hooks", {}).values():
            returned = post_hook(self, result)
            if returned is not None:
                result = returned
        return result

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` taken from a Hybrid with the same optimizers and groups."""
        for pre_hook in getattr(self, "_optimizer_load_state_dict_pre_hooks", {}).values():
            returned = pre_hook(self, state_dict)
            if returned is not None:
                state_dict = returned
        saved = [[str(name), int(count)] for name, count in state_dict.get("optimizers", [])]
        live = [[name, len(optimizer.param_groups)] for name, optimizer in self.optimizers.items()]
        if saved != live:
            raise ValueError(f"the state dict is for a Hybrid with optimizers (name, param "
                             f"groups) {saved}, this one has {live}")
        groups, state = state_dict["param_groups"], state_dict["state"]
        start = 0
        for optimizer in self.optimizers.values():
            count = len(optimizer.param_groups)
            own = groups[start:start + count]
            start += count
            local = {saved_id: i for i, saved_id in
                     enumerate(saved_id for g in own for saved_id in g["params"])}
            optimizer.load_state_dict({
                "state": {local[i]: s for i, s in state.items() if i in local},
                "param_groups": [{**g, "params": [local[i] for i in g["params"]]} for g in own],
            })
        for post_hook in getattr(self, "_optimizer_load_state_dict_post_hooks", {}).values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizers": self.optimizers, "defaults": self.defaults, "_ready": True}

    def __repr__(self) -> str:
        inner = ",\n".join(f"  {name}: {optimizer!r}".replace("\n", "\n  ")
                           for name, optimizer in self.optimizers.items())
        return f"Hybrid(\n{inner}\n)"


class _Groups:
    """Stand-in with ``param_groups`` for an overlap check of groups not yet added."""

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.param_groups = groups


def _check_disjoint(optimizers: Mapping[str, Any]) -> None:
    """Refuse a parameter that appears in two places, naming both."""
    seen: dict[int, str] = {}
    for name, optimizer in optimizers.items():
        for gi, group in enumerate(optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                where = f"{name!r} (param group {gi}, parameter {pi})"
                if id(p) in seen:
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is in Hybrid optimizer "
                        f"{seen[id(p)]} and in {where}; each parameter must belong to exactly "
                        "one optimizer (see gradguard.optim.hybrid.split_parameters)")
                seen[id(p)] = where
