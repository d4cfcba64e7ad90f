"""Adagrad (Duchi, Hazan & Singer 2011).

Drop-in for ``torch.optim.Adagrad``: same arguments, defaults, param-group keys
(except torch's ``foreach``/``fused``/``differentiable`` flags, replaced by one
``impl``) and state keys (``step``, ``sum``). Like torch, the state of every
parameter given to the constructor exists from construction on, so a
``state_dict()`` taken before the first step has torch's layout too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _sparse
from ._validation import FLAG, NON_NEGATIVE, POSITIVE, Rule
from .base import Optimizer, ParamsT, as_float, cpu_blocks, group_by_device_and_dtype


class Adagrad(Optimizer):
    r"""Adagrad: per-coordinate steps scaled by the root of the summed squared gradients.

    For each parameter :math:`\theta` with gradient :math:`g_t` at step :math:`t = 1, 2, \dots`,
    starting from :math:`s_0 = \tau` (``initial_accumulator_value``):

    .. math::
        g_t &\leftarrow -g_t \text{ if maximize} \\
        g_t &\leftarrow g_t + \lambda\theta \quad \text{(coupled weight decay)} \\
        \tilde\gamma_t &= \gamma / (1 + (t-1)\eta) \\
        s_t &= s_{t-1} + g_t^2 \\
        \theta &\leftarrow \theta - \tilde\gamma_t \, \frac{g_t}{\sqrt{s_t} + \epsilon}

    eps is added *after* the square root (std = sqrt(sum) + eps), as in torch.optim.
    The accumulator keeps the squares of the weight-decayed gradients.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma` (default 1e-2), ``>= 0``.
        lr_decay: :math:`\eta \ge 0` (default 0); the step size decays as
            :math:`\gamma / (1 + (t-1)\eta)`.
        weight_decay: :math:`\lambda \ge 0` (default 0), added to the gradient.
        initial_accumulator_value: :math:`\tau \ge 0` (default 0), the starting value of ``sum``.
            Each parameter group's own value is used; torch.optim uses the constructor's
            value for every group (a group's key is ignored there).
        eps: :math:`\epsilon > 0` (default 1e-10). torch allows 0, which turns a
            never-updated coordinate into 0/0 when :math:`\tau = 0`; gradguard refuses it.
        maximize: ascend instead of descend (default False).
        impl: ``"auto"``, ``"reference"``, ``"foreach"`` or ``"fused"`` (torch's
            ``_fused_adagrad_`` kernel).
        state_dtype: dtype of ``sum`` (default: float32 for half-precision
            parameters, else the parameter's dtype).

    **Sparse gradients** (``nn.Embedding(sparse=True)``, ``nn.EmbeddingBag(sparse=True)``)
    get torch.optim's sparse path, lazily: duplicate rows are summed, the update above
    is applied to the touched rows only, and every other row of the parameter and of
    ``sum`` stays bit-identical (the step counter still advances for the whole tensor).
    Coupled ``weight_decay`` cannot be applied lazily (it would touch every row) and is
    refused with sparse gradients, as in torch. With numba installed
    (``gradguard[fast]``) a compiled CPU kernel does the update (``impl="reference"``
    keeps the torch ops); see ``docs/embeddings.md``.

    Per-row update counts: a parameter group with ``"count_row_updates": True`` (a
    group key, so the constructor keeps torch's signature) keeps
    ``state["row_update_count"]`` (int64, one per row along dim 0), incremented for
    each row a step updates, all rows for a dense gradient.

    Reference: Duchi, Hazan & Singer, "Adaptive Subgradient Methods for Online Learning
    and Stochastic Optimization", JMLR 12, 2011.
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference", "foreach", "fused")
    fused_takes_scaling: ClassVar[bool] = True
    sparse_gradients: ClassVar[bool] = True
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": NON_NEGATIVE,
        "lr_decay": NON_NEGATIVE,
        "weight_decay": NON_NEGATIVE,
        "initial_accumulator_value": NON_NEGATIVE,
        "eps": POSITIVE,
        "maximize": FLAG,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
    ) -> None:
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            "maximize": maximize,
        }
        super().__init__(params, defaults, impl=impl, state_dtype=state_dtype)
        # torch.optim.Adagrad creates its state here rather than at the first step;
        # parameters of groups added later get theirs lazily, as in torch.
        for group in self.param_groups:
            impl_now = self._impl_for_placement(group)
            for p in group["params"]:
                if not self.state.get(p):
                    state: dict[str, Any] = {}
                    self._init_state(group, p, state, self.state_dtype(group, p), impl_now)
                    self.state[p] = state

    def _why_not_fused(self, group: Mapping[str, Any], params: list[Tensor]) -> str | None:
        # torch.optim.Adagrad enables its fused kernel on the CPU only; the CUDA kernel
        # behind torch._fused_adagrad_ leaves .grad scaled in its vectorised path
        for p in params:
            if p.device.type != "cpu":
                return f"torch's fused Adagrad kernel runs on the cpu only, not {p.device.type}"
        return super()._why_not_fused(group, params)

    def _impl_for_placement(self, group: dict[str, Any]) -> str:
        """The impl that decides where step counters live; errors wait for ``step()``."""
        try:
            return self.resolve_impl(group, group["params"])
        except ValueError:
            return "reference"

    def share_memory(self) -> None:
        """Move every ``sum`` to shared memory (Hogwild training), as torch.optim.Adagrad."""
        for state in self.state.values():
            if "sum" in state:
                state["sum"].share_memory_()

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        _sparse.check_count_flag(group)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        state["step"] = self.step_counter(p, impl)
        initial = as_float(group["initial_accumulator_value"])
        state["sum"] = torch.full_like(p, initial, dtype=dtype,
                                       memory_format=torch.preserve_format)
        _sparse.row_counts(group, p, state)

    def _check_gradients(self, group: dict[str, Any], params: list[Tensor],
                         grads: list[Tensor]) -> None:
        super()._check_gradients(group, params, grads)
        for p, g in zip(params, grads, strict=True):
            if g.is_sparse and group["weight_decay"] != 0:
                raise RuntimeError(
                    f"Adagrad: weight_decay={group['weight_decay']} cannot be applied lazily "
                    f"to the sparse gradient of {_sparse.describe(self, group, p)}: coupled "
                    "weight decay adds weight_decay * param to every row's gradient, so every "
                    "row would change. Use weight_decay=0 for this group (a separate group "
                    "for the embeddings), or RowWiseAdagrad, whose weight decay is applied to "
                    "the touched rows")

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], impl: str, *, grad_scale: Tensor | None = None,
                found_inf: Tensor | None = None) -> None:
        for p, state in zip(params, states, strict=True):
            _sparse.count_all_rows(_sparse.row_counts(group, p, state))
        scaling = {"grad_scale": grad_scale, "found_inf": found_inf} if impl == "fused" else {}
        _IMPLS[impl](
            params,
            grads,
            [s["sum"] for s in states],
            [s["step"] for s in states],
            lr=as_float(group["lr"]),
            lr_decay=group["lr_decay"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=group["maximize"],
            **scaling,
        )

    def _update_sparse(self, group: dict[str, Any], param: Tensor, grad: Tensor,
                       state: dict[str, Any]) -> None:
        _sparse.advance(state["step"])
        clr = as_float(group["lr"]) / (1 + (state["step"].item() - 1) * group["lr_decay"])
        counts = _sparse.row_counts(group, param, state)
        scalars = [-clr, float(group["eps"]), -1.0 if group["maximize"] else 1.0]
        torch_ops = _sparse.kernel_or_rows("adagrad", group, param, grad, [state["sum"]],
                                           scalars, counts)
        if torch_ops is not None:
            rows, table, (sums,) = torch_ops
            touched = _sparse_adagrad(table, sums, rows, clr=clr, eps=group["eps"],
                                      maximize=group["maximize"])
            _sparse.count_touched(counts, touched, rows.num_rows)


def _sparse_adagrad(table: Tensor, state_sum: Tensor, grad: _sparse.RowGrad, *, clr: float,
                    eps: float, maximize: bool) -> Tensor:
    """torch.optim.Adagrad's sparse step with torch ops, on the touched rows of ``table``
    (the parameter as rows) and ``state_sum``; returns the touched rows."""
    rows, values = _sparse.coalesce(grad)
    values = values.to(state_sum.dtype)
    if maximize:
        values.neg_()
    sums = state_sum.index_select(0, rows)
    params = table.index_select(0, rows).to(state_sum.dtype)
    _dense_adagrad_step(params, values, sums, clr=clr, eps=eps)
    state_sum.index_copy_(0, rows, sums)
    table.index_copy_(0, rows, params.to(table.dtype))
    return rows


def _reference_adagrad(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor],
                       steps: list[Tensor], *, lr: float, lr_decay: float, weight_decay: float,
                       eps: float, maximize: bool) -> None:
    for i, param in enumerate(params):
        steps[i] += 1
        step = steps[i].item()
        grad = -grads[i] if maximize else grads[i]
        if weight_decay != 0:
            grad = grad.add(param, alpha=weight_decay)
        clr = lr / (1 + (step - 1) * lr_decay)
        _dense_adagrad_step(param, grad, state_sums[i], clr=clr, eps=eps)


def _dense_adagrad_step(param: Tensor, grad: Tensor, state_sum: Tensor, *, clr: float,
                        eps: float) -> None:
    state_sum.addcmul_(grad, grad, value=1)
    std = state_sum.sqrt().add_(eps)
    param.addcdiv_(grad, std, value=-clr)


def _foreach_adagrad(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor],
                     steps: list[Tensor], *, lr: float, lr_decay: float, weight_decay: float,
                     eps: float, maximize: bool) -> None:
    # Negating the gradient only flips signs, which is exact: with maximize the update
    # uses -g directly (g*g and the step's sign absorb it), so no negated copy is made.
    # With weight decay, g - wd*theta is exactly -(-g + wd*theta).
    sign = -1.0 if maximize else 1.0
    for _, (d_params, d_grads, d_sums, d_steps) in group_by_device_and_dtype(
            params, grads, state_sums, steps):
        torch._foreach_add_(d_steps, 1)
        step_sizes = [-sign * lr / (1 + (s.item() - 1) * lr_decay) for s in d_steps]
        for (c_params, c_grads, c_sums), (c_sizes,) in cpu_blocks(
                [d_params, d_grads, d_sums], [step_sizes]):
            if weight_decay != 0:
                c_grads = list(torch._foreach_add(c_grads, c_params,
                                                  alpha=sign * weight_decay))
            torch._foreach_addcmul_(c_sums, c_grads, c_grads, value=1)
            std = torch._foreach_sqrt(c_sums)
            torch._foreach_add_(std, eps)
            torch._foreach_addcdiv_(c_params, c_grads, std, c_sizes)


def _fused_adagrad(params: list[Tensor], grads: list[Tensor], state_sums: list[Tensor],
                   steps: list[Tensor], *, lr: float, lr_decay: float, weight_decay: float,
                   eps: float, maximize: bool, grad_scale: Tensor | None = None,
                   found_inf: Tensor | None = None) -> None:
    for _, (d_params, d_grads, d_sums, d_steps) in group_by_device_and_dtype(
            params, grads, state_sums, steps):
        torch._foreach_add_(d_steps, 1)
        torch._fused_adagrad_(d_params, d_grads, d_sums, d_steps, lr=lr, lr_decay=lr_decay,
                              weight_decay=weight_decay, eps=eps, maximize=maximize,
                              grad_scale=grad_scale, found_inf=found_inf)
        if found_inf is not None:  # a skipped step must not advance the counter
            torch._foreach_sub_(d_steps, [found_inf] * len(d_steps))


_IMPLS = {"reference": _reference_adagrad, "foreach": _foreach_adagrad,
          "fused": _fused_adagrad}
