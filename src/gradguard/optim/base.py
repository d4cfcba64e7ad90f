"""The base class every gradguard optimizer derives from.

It is a :class:`torch.optim.Optimizer`, so LR schedulers, ``GradScaler``,
step hooks, trainers and ``state_dict()`` work unchanged. On top of torch's
base it adds three things, once, for every algorithm:

* **validated hyperparameters**: each subclass lists a :class:`Rule` per
  hyperparameter; every parameter group is checked against them, so a bad value
  raises ``ValueError`` naming the argument, the value and what is allowed;
* **one implementation choice**: ``impl`` is ``"reference"`` (readable
  per-tensor math), ``"foreach"`` (torch's multi-tensor ops), ``"fused"``
  (torch's fused kernels, where the algorithm has one) or ``"auto"`` (the
  fastest valid path for the group's devices and dtypes), resolved at each step
  from the tensors actually present;
* **state precision**: ``state_dtype`` (default: float32 state for
  float16/bfloat16 parameters, the parameter's dtype otherwise). When the state
  dtype differs from the parameter's, the update is computed in the state dtype
  and the result rounded once into the parameter.

Subclasses implement :meth:`_init_state` (create one parameter's state) and
:meth:`_update` (apply the algorithm to lists of tensors with the chosen impl).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _sparse
from ._validation import Choice, Rule

IMPLS: tuple[str, ...] = ("auto", "reference", "foreach", "fused")
"""The values ``impl=`` accepts."""

FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
LOW_PRECISION: frozenset[torch.dtype] = frozenset({torch.float16, torch.bfloat16})
FUSED_DEVICES: frozenset[str] = frozenset({"cpu", "cuda"})

# Keys torch.optim keeps in param groups to pick an implementation. gradguard
# has one ``impl`` key instead; these are translated when a torch.optim state
# dict is loaded.
_TORCH_IMPL_KEYS: tuple[str, ...] = ("foreach", "fused", "capturable", "differentiable")

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]


def dtype_name(dtype: torch.dtype | str | None) -> str | None:
    """Normalise a ``state_dtype`` argument to its name (``"float32"``) or None."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        for name, value in FLOAT_DTYPES.items():
            if value == dtype:
                return name
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name in FLOAT_DTYPES:
            return name
    raise ValueError(f"invalid state_dtype={dtype!r}: allowed are None or one of "
                     + ", ".join(FLOAT_DTYPES))


def scalar_step(device: torch.device | None = None) -> Tensor:
    """A fresh step counter: a 0-dim float tensor, as torch.optim keeps it.

    float32 (float64 when that is torch's default dtype) on the CPU; on the
    parameter's device when the fused kernels need it there. Never the
    parameter's low-precision dtype, so counts stay exact to 2**24 or beyond.
    """
    if device is not None and device.type != "cpu":
        return torch.zeros((), dtype=torch.float32, device=device)
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(0.0, dtype=dtype)


def as_float(value: float | Tensor) -> float:
    """A hyperparameter given as a number or a 1-element tensor, as a float."""
    return value.item() if isinstance(value, Tensor) else float(value)


def device_dtype_runs(tensors: list[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), for foreach and fused kernels.

    Indices rather than sublists, so state created inside a run (a first momentum
    buffer) can be written back to its place in the caller's list.
    """
    runs: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        runs.setdefault((t.device, t.dtype), []).append(i)
    return list(runs.values())


def group_by_device_and_dtype(
    *tensor_lists: list[Tensor],
) -> list[tuple[tuple[torch.device, torch.dtype], list[list[Tensor]]]]:
    """Split parallel tensor lists into runs sharing the first list's device and dtype.

    foreach and fused kernels take tensors of one device and dtype at a time.
    Empty lists (e.g. ``max_exp_avg_sqs`` without amsgrad) stay empty.
    """
    first = tensor_lists[0]
    return [
        ((first[idx[0]].device, first[idx[0]].dtype),
         [[lst[i] for i in idx] if lst else [] for lst in tensor_lists])
        for idx in device_dtype_runs(first)
    ]


CPU_BLOCK_BYTES = 1 << 21
"""Bytes of each tensor list that one block of :func:`cpu_blocks` covers."""


def cpu_blocks(tensor_lists: Sequence[list[Tensor]], scalar_lists: Sequence[list[float]] = (),
               ) -> Iterator[tuple[list[list[Tensor]], list[list[float]]]]:
    """Re-cut parallel lists of tensors (one device and dtype) into cache-sized blocks.

    On CUDA a foreach op is one kernel launch over the whole list, and the lists
    come back whole. On the CPU a foreach op is a loop over its tensors, so
    applying each op of an update to the whole list streams every operand through
    main memory once per op. Applying all the ops of an elementwise update to one
    block of about :data:`CPU_BLOCK_BYTES` per list before the next keeps the
    operands and temporaries in cache: 1.5-2x faster than torch's foreach and
    for-loop paths on 25M float32 parameters (``benchmarks/optim_step.py``).

    Runs of small tensors share a block; a larger tensor is cut into flat slices
    when it is contiguous in every list (views, so in-place updates reach the
    originals), and is a block of its own otherwise. ``scalar_lists`` hold one
    value per tensor (a per-tensor step size), repeated for each of its slices.
    Empty lists (absent optional state) stay empty. Results are elementwise
    identical to one foreach call over the whole lists.
    """
    live = [lst for lst in tensor_lists if lst]
    first = live[0] if live else []
    if not first or first[0].device.type != "cpu":
        yield list(tensor_lists), list(scalar_lists)
        return

    def cut(lists: Sequence[list[Tensor] | list[float]], start: int, stop: int) -> list[Any]:
        return [lst[start:stop] if lst else [] for lst in lists]

    limit = max(1, CPU_BLOCK_BYTES // first[0].element_size())
    start, size = 0, 0  # the pending run of small tensors is first[start:i]
    for i, tensor in enumerate(first):
        numel = tensor.numel()
        if numel <= limit:
            if size + numel > limit:
                yield cut(tensor_lists, start, i), cut(scalar_lists, start, i)
                start, size = i, 0
            size += numel
            continue
        if start < i:
            yield cut(tensor_lists, start, i), cut(scalar_lists, start, i)
        start, size = i + 1, 0
        row = [lst[i] if lst else None for lst in tensor_lists]
        values = cut(scalar_lists, i, i + 1)
        if not all(t.is_contiguous() for t in row if t is not None):
            yield [[t] if t is not None else [] for t in row], values
            continue
        pieces = -(-numel // limit)
        slices = [t.view(-1).tensor_split(pieces) if t is not None else None for t in row]
        for k in range(pieces):
            yield [[sl[k]] if sl is not None else [] for sl in slices], values
    if start < len(first):
        yield cut(tensor_lists, start, len(first)), cut(scalar_lists, start, len(first))


class StepScaling:
    """One step's ``grad_scale`` / ``found_inf`` (see :meth:`Optimizer.step`).

    ``found_inf`` is read on the host at most once per step, and only when an
    implementation cannot take it into its kernels.
    """

    def __init__(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        self.grad_scale = grad_scale
        self.found_inf = found_inf
        self._skipped: bool | None = None

    def kernel_kwargs(self) -> dict[str, Tensor | None]:
        """The keywords torch's fused kernels take."""
        return {"grad_scale": self.grad_scale, "found_inf": self.found_inf}

    def skipped(self) -> bool:
        """Whether ``found_inf`` says to skip the step (read on the host once, then cached)."""
        if self._skipped is None:
            self._skipped = self.found_inf is not None and bool(self.found_inf.item())
        return self._skipped

    def unscale_(self, grads: list[Tensor]) -> None:
        """Divide ``grads`` by ``grad_scale`` in place, as the fused kernels do."""
        if self.grad_scale is None:
            return
        for run in device_dtype_runs(grads):
            run_grads = [grads[i] for i in run]
            torch._foreach_div_(run_grads, self.grad_scale.to(run_grads[0].device))


class Optimizer(torch.optim.Optimizer):
    """Base class: torch.optim's contract plus validation, ``impl`` and ``state_dtype``."""

    supported_impls: ClassVar[tuple[str, ...]] = ("reference", "foreach")
    """Implementations this algorithm has (besides ``"auto"``)."""

    hyperparameter_rules: ClassVar[Mapping[str, Rule]] = {}
    """What each hyperparameter may be; checked for every parameter group."""

    fused_takes_scaling: ClassVar[bool] = False
    """Whether :meth:`_update` accepts ``grad_scale`` and ``found_inf`` and hands them to
    the fused kernels (see :meth:`step`)."""

    sparse_gradients: ClassVar[bool] = False
    """Whether the algorithm takes sparse gradients (``nn.Embedding(sparse=True)``):
    they go to :meth:`_update_sparse`, one parameter at a time, whatever ``impl``."""

    dense_gradients: ClassVar[bool] = True
    """Whether the algorithm takes dense gradients (``SparseAdam`` does not)."""

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        defaults = dict(defaults, impl=impl, state_dtype=dtype_name(state_dtype))
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            group["state_dtype"] = dtype_name(group["state_dtype"])
            self._validate_group(group)
        except ValueError as err:
            self.param_groups.pop()
            index = len(self.param_groups)
            raise ValueError(f"{type(self).__name__}, param group {index}: {err}") from None

    def _validate_group(self, group: dict[str, Any]) -> None:
        for name, rule in self.hyperparameter_rules.items():
            rule.check(name, group[name])
        Choice(("auto", *self.supported_impls)).check("impl", group["impl"])
        for i, p in enumerate(group["params"]):
            if not p.is_floating_point():
                raise ValueError(
                    f"parameter {i} has dtype {p.dtype}; allowed are floating-point "
                    "parameters (float16, bfloat16, float32, float64)")

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Accept torch.optim state dicts: fill missing keys, map torch's impl flags."""
        super().__setstate__(state)
        for group in self.param_groups:
            if "impl" not in group:
                if group.get("fused") and "fused" in self.supported_impls:
                    group["impl"] = "fused"
                elif group.get("foreach") and "foreach" in self.supported_impls:
                    group["impl"] = "foreach"
                else:
                    group["impl"] = "auto"
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            for key in _TORCH_IMPL_KEYS:
                group.pop(key, None)
            for p in group["params"]:
                p_state = self.state.get(p)
                if p_state and "step" in p_state and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = scalar_step().fill_(float(p_state["step"]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a gradguard or torch.optim state dict.

        Unlike torch, the loaded state never shares tensors with ``state_dict``
        (torch keeps the caller's tensors where no cast is needed, so two
        optimizers loaded from one live state dict would update each other).
        Where this optimizer keeps state in a wider dtype than the parameter
        (``state_dtype``), the saved values are restored at that precision rather
        than through torch's cast to the parameter dtype, and 0-dim scalar state
        keeps its saved dtype on the CPU, so a resumed run is bit-identical.
        """
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        groups = [g for g in self.param_groups for _ in g["params"]]
        for saved_id, p, group in zip(saved_ids, params, groups, strict=True):
            saved = state_dict["state"].get(saved_id)
            if not saved:
                continue
            dtype = self.state_dtype(group, p)
            state = self.state[p]
            for key, value in saved.items():
                if not torch.is_tensor(value):
                    continue
                if key != "step" and value.dim() == 0:
                    # scalar bookkeeping (NAdam's mu_product) keeps its saved dtype and
                    # stays on the CPU; torch casts it to the parameter's dtype, so a
                    # resumed run would round differently from an uninterrupted one
                    state[key] = value.to(device="cpu", copy=True)
                elif key != "step" and value.is_floating_point() and dtype != p.dtype:
                    state[key] = value.to(device=p.device, dtype=dtype, copy=True)
                elif state.get(key) is value:
                    state[key] = value.clone()

    # ------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the loss, as in torch.

        ``grad_scale`` and ``found_inf`` (0-dim float tensors, keyword-only) are the
        contract of torch's fused kernels, for callers that have already made their
        pass over the gradients (a guard, gradient clipping, loss scaling) and should
        not need a second one:

        * every gradient is divided by ``grad_scale`` before the update, and is left
          divided in ``.grad`` (as torch's fused kernels and ``GradScaler.unscale_``
          leave it). Clipping to ``max_norm`` is ``grad_scale = norm / max_norm``;
        * a non-zero ``found_inf`` skips the step: parameters, state and step
          counters keep their values (a fused kernel's first step may leave freshly
          created zero state, which is what the next step would create anyway).

        With ``impl="fused"`` both go into the kernels (no extra pass over memory, no
        host synchronisation), for every algorithm with :attr:`fused_takes_scaling`.
        Otherwise ``found_inf`` is read on
        the host once per step (a synchronisation on GPU) and the gradients are divided
        in place before the update.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        scaling = (StepScaling(grad_scale, found_inf)
                   if grad_scale is not None or found_inf is not None else None)
        if self.sparse_gradients:
            self.check_sparse_indices()
        # the compiled sparse steps of all tables run together, once the groups are done
        with _sparse.batch() if self.sparse_gradients else contextlib.nullcontext():
            for group in self.param_groups:
                params = [p for p in group["params"] if p.grad is not None]
                if params:
                    self._step_group(group, params, scaling)
        return loss

    def check_sparse_indices(self) -> None:
        """Refuse the coming step if a sparse gradient holds an index outside its parameter's
        shape (an embedding id that is negative or not below the number of rows).

        Raises IndexError naming the parameter, the lookup and the id, before anything
        changes: no parameter, state or step counter of any group. :meth:`step` calls it
        first; :class:`~gradguard.optim.hybrid.Hybrid` calls it on each of its optimizers
        before stepping any.
        """
        pairs = [(group, p, grad) for group in self.param_groups for p in group["params"]
                 if (grad := p.grad) is not None and grad.is_sparse]
        if not pairs:
            return
        found = _sparse.first_out_of_range([grad for _, _, grad in pairs])
        if found is not None:
            group, p, _ = pairs[found.position]
            raise IndexError(f"{found.message(_sparse.describe(self, group, p))}; the step "
                             "changed nothing")

    def _step_group(self, group: dict[str, Any], params: list[Tensor],
                    scaling: StepScaling | None = None) -> None:
        grads: list[Tensor] = [p.grad for p in params if p.grad is not None]
        self._check_gradients(group, params, grads)
        if self.sparse_gradients and any(g.is_sparse for g in grads):
            params = self._step_sparse(group, params, grads, scaling)
            if not params:
                return
            grads = [p.grad for p in params if p.grad is not None]
        impl = self.resolve_impl(group, params)
        kernel_scaling: dict[str, Tensor | None] = {}
        if scaling is not None:
            if impl == "fused" and self.fused_takes_scaling:
                kernel_scaling = scaling.kernel_kwargs()
            elif scaling.skipped():
                return
            else:
                scaling.unscale_(grads)
        states = [self._state_of(group, p, impl) for p in params]
        work_params = [p if self.state_dtype(group, p) == p.dtype
                       else p.to(self.state_dtype(group, p)) for p in params]
        work_grads = [g if g.dtype == w.dtype else g.to(w.dtype)
                      for g, w in zip(grads, work_params, strict=True)]
        self._update(group, work_params, work_grads, states, impl, **kernel_scaling)
        for p, w in zip(params, work_params, strict=True):
            if w is not p:
                p.copy_(w)

    def _step_sparse(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                     scaling: StepScaling | None) -> list[Tensor]:
        """Update the parameters whose gradients are sparse; return the others.

        Each goes to :meth:`_update_sparse` with its state, in its own dtype (the
        update gathers the touched rows and computes in the state dtype itself, so
        a half-precision table is never copied whole). ``scaling`` as in
        :meth:`step`: a skipped step leaves them alone, ``grad_scale`` divides them.
        """
        dense = [p for p, g in zip(params, grads, strict=True) if not g.is_sparse]
        if scaling is not None and scaling.skipped():
            return dense
        for p, g in zip(params, grads, strict=True):
            if g.is_sparse:
                if scaling is not None and scaling.grad_scale is not None:
                    g.div_(scaling.grad_scale.to(g.device))
                self._update_sparse(group, p, g, self._state_of(group, p, "reference"))
        return dense

    def _check_gradients(self, group: dict[str, Any], params: list[Tensor],
                         grads: list[Tensor]) -> None:
        for p, g in zip(params, grads, strict=True):
            if g.is_sparse and not self.sparse_gradients:
                index = next(i for i, q in enumerate(group["params"]) if q is p)
                raise RuntimeError(
                    f"{type(self).__name__} got a sparse gradient for parameter {index} of its "
                    f"group (shape {tuple(p.shape)}); it takes dense gradients only")

    def state_dtype(self, group: Mapping[str, Any], p: Tensor) -> torch.dtype:
        """The dtype this parameter's state is kept (and its update computed) in."""
        name = group.get("state_dtype")
        if name is not None:
            return FLOAT_DTYPES[name]
        return torch.float32 if p.dtype in LOW_PRECISION else p.dtype

    def resolve_impl(self, group: Mapping[str, Any], params: list[Tensor]) -> str:
        """The implementation ``group["impl"]`` means for these tensors."""
        requested = group["impl"]
        why_not_fused = self._why_not_fused(group, params)
        if requested == "auto":
            if why_not_fused is None:
                return "fused"
            return "foreach" if "foreach" in self.supported_impls else "reference"
        if requested == "fused" and why_not_fused is not None:
            raise ValueError(f"impl='fused' is not available for {type(self).__name__} here: "
                             f"{why_not_fused}; use impl='auto' to pick the fastest valid path")
        return str(requested)

    def _why_not_fused(self, group: Mapping[str, Any], params: list[Tensor]) -> str | None:
        if "fused" not in self.supported_impls:
            return "torch has no fused kernel for this algorithm"
        for p in params:
            if p.device.type not in FUSED_DEVICES:
                return f"fused kernels run on cpu and cuda, not {p.device.type}"
            if self.state_dtype(group, p) != p.dtype:
                return (f"state_dtype {self.state_dtype(group, p)} differs from the parameter "
                        f"dtype {p.dtype}")
        return None

    def _state_of(self, group: dict[str, Any], p: Tensor, impl: str) -> dict[str, Any]:
        state = self.state.get(p)
        if not state:
            # Like torch.optim, a parameter whose algorithm keeps no state (SGD
            # without momentum) gets no entry in ``state``.
            state = {}
            self._init_state(group, p, state, self.state_dtype(group, p), impl)
            if state:
                self.state[p] = state
        elif impl == "fused" and "step" in state and state["step"].device != p.device:
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        return state

    # ------------------------------------------------------- subclass contract
    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        """Create the state of parameter ``p`` (tensors of ``dtype``) in ``state``."""
        raise NotImplementedError

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], impl: str) -> None:
        """Apply one step of the algorithm to ``params`` in place with ``impl``.

        An algorithm with fused kernels may accept the keywords ``grad_scale`` and
        ``found_inf`` and hand them to its kernels; the base passes them when
        ``impl == "fused"`` (see :meth:`step`) instead of skipping or dividing itself.
        """
        raise NotImplementedError

    def _update_sparse(self, group: dict[str, Any], param: Tensor, grad: Tensor,
                       state: dict[str, Any]) -> None:
        """Apply one step to ``param`` from its sparse ``grad``, touching only its rows
        (for algorithms with :attr:`sparse_gradients`)."""
        raise NotImplementedError

    @staticmethod
    def zeros_like(p: Tensor, dtype: torch.dtype) -> Tensor:
        """A zero state tensor shaped like ``p``."""
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    @staticmethod
    def step_counter(p: Tensor, impl: str) -> Tensor:
        """A fresh step counter placed where ``impl`` will read it."""
        return scalar_step(p.device if impl == "fused" else None)
