"""Row-wise Adagrad: one accumulator per embedding row (FBGEMM's EXACT_ROWWISE_ADAGRAD).

torch.optim has no row-wise Adagrad; the update rule, defaults and weight-decay
modes follow FBGEMM's ``rowwise_adagrad`` (``fbgemm_gpu``, the optimizer of
TorchRec's fused embedding tables). State keys: ``step`` (a 0-dim float counter)
and ``sum`` (FBGEMM's ``momentum1``), one value per row: shape ``param.shape[:1]``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _sparse
from ._validation import FLAG, NON_NEGATIVE, POSITIVE, Choice, Rule
from .base import Optimizer, ParamsT, as_float

WEIGHT_DECAY_MODES: tuple[str, ...] = ("none", "l2", "decoupled")
"""The values ``weight_decay_mode`` accepts."""

_MODE_CODES = {"none": 0, "l2": 1, "decoupled": 2}


class RowWiseAdagrad(Optimizer):
    r"""Row-wise Adagrad: Adagrad with one accumulator per row, the row's mean squared gradient.

    A *row* is a slice along dim 0 (an embedding); for a 1-D parameter each element
    is a row, a 0-dim parameter is one row. For each row :math:`r` with gradient row
    :math:`g_r` (duplicate lookups summed) of :math:`D` values, starting from
    :math:`s_r = \tau` (``initial_accumulator_value``):

    .. math::
        g_r &\leftarrow -g_r \text{ if maximize} \\
        s_r &\leftarrow s_r + \frac{1}{D}\sum_{d}
            \left(g_{r,d} + [\text{l2}]\,\lambda\theta_{r,d}\right)^2 \\
        \mu_r &= \gamma / (\sqrt{s_r} + \epsilon) \\
        \theta_r &\leftarrow c_r\,\theta_r - \mu_r g_r, \qquad c_r = \begin{cases}
            1 - \mu_r\lambda & \text{l2} \\ 1 - \gamma\lambda & \text{decoupled} \\ 1 & \text{none}
        \end{cases}

    With ``"l2"`` this is :math:`\theta_r - \mu_r (g_r + \lambda\theta_r)`: the decay is
    added to the gradient (and its square accumulated); ``"decoupled"`` shrinks the
    row by :math:`\gamma\lambda` apart from the adaptive step. eps is added after the
    square root. This is FBGEMM's ``EXACT_ROWWISE_ADAGRAD`` (``weight_decay_mode``
    NONE / L2 / DECOUPLE).

    State memory is one value per row: :math:`1/D` of :class:`Adagrad`'s. **Sparse
    gradients** (``nn.Embedding(sparse=True)``) update lazily: only the touched rows
    are read and written, weight decay included (as FBGEMM applies it), and every
    other row of the parameter and of ``sum`` stays bit-identical. With numba
    installed (``gradguard[fast]``) a compiled CPU kernel does the sparse update
    (``impl="reference"`` keeps the torch ops); see ``docs/embeddings.md``.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma` (default 0.01, FBGEMM's), ``>= 0``.
        eps: :math:`\epsilon > 0` (default 1e-8, FBGEMM's).
        weight_decay: :math:`\lambda \ge 0` (default 0).
        weight_decay_mode: ``"l2"`` (default), ``"decoupled"`` or ``"none"`` (no decay
            whatever ``weight_decay`` is).
        initial_accumulator_value: :math:`\tau \ge 0` (default 0).
        maximize: ascend instead of descend (default False).
        impl: ``"auto"`` (the compiled kernel for sparse gradients when numba is
            installed and the tensors allow, else torch ops) or ``"reference"`` (torch ops).
        state_dtype: dtype of ``sum`` (default: float32 for half-precision
            parameters, else the parameter's dtype).
        count_row_updates: keep ``state["row_update_count"]`` (int64, one per row),
            incremented for each row a step updates (default False).

    Reference: FBGEMM, ``fbgemm_gpu/codegen/genscript/optimizers.py``,
    ``rowwise_adagrad``; Duchi, Hazan & Singer, JMLR 12, 2011 (Adagrad).
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference",)
    sparse_gradients: ClassVar[bool] = True
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": NON_NEGATIVE,
        "eps": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "weight_decay_mode": Choice(WEIGHT_DECAY_MODES),
        "initial_accumulator_value": NON_NEGATIVE,
        "maximize": FLAG,
        "count_row_updates": FLAG,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-2,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        weight_decay_mode: str = "l2",
        initial_accumulator_value: float = 0.0,
        *,
        maximize: bool = False,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
        count_row_updates: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "eps": eps,
            "weight_decay": weight_decay,
            "weight_decay_mode": weight_decay_mode,
            "initial_accumulator_value": initial_accumulator_value,
            "maximize": maximize,
            "count_row_updates": count_row_updates,
        }
        super().__init__(params, defaults, impl=impl, state_dtype=state_dtype)

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        state["step"] = self.step_counter(p, "reference")
        state["sum"] = torch.full(p.shape[:1], float(group["initial_accumulator_value"]),
                                  dtype=dtype, device=p.device)
        _sparse.row_counts(group, p, state)

    def _check_gradients(self, group: dict[str, Any], params: list[Tensor],
                         grads: list[Tensor]) -> None:
        super()._check_gradients(group, params, grads)
        for p, g in zip(params, grads, strict=True):
            if g.is_sparse and g.sparse_dim() != 1:
                raise RuntimeError(
                    f"RowWiseAdagrad got a sparse gradient with {g.sparse_dim()} sparse "
                    f"dimensions for {_sparse.describe(self, group, p)}; a row-wise update "
                    "needs whole rows: one sparse dimension, as nn.Embedding(sparse=True) "
                    "gives")

    def _arguments(self, group: dict[str, Any]) -> dict[str, Any]:
        mode = group["weight_decay_mode"] if float(group["weight_decay"]) != 0 else "none"
        return {"lr": as_float(group["lr"]), "eps": float(group["eps"]),
                "weight_decay": float(group["weight_decay"]), "mode": mode,
                "maximize": group["maximize"]}

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], impl: str) -> None:
        arguments = self._arguments(group)
        for p, g, state in zip(params, grads, states, strict=True):
            state["step"] += 1
            rows = p.shape[0] if p.dim() else 1
            table = p.view(rows, -1) if p.is_contiguous() else p.reshape(rows, -1).clone()
            _rowwise_adagrad(table, g.reshape(rows, -1), state["sum"].view(rows), **arguments)
            if not p.is_contiguous():
                p.copy_(table.view_as(p))
            _sparse.count_all_rows(_sparse.row_counts(group, p, state))

    def _update_sparse(self, group: dict[str, Any], param: Tensor, grad: Tensor,
                       state: dict[str, Any]) -> None:
        _sparse.advance(state["step"])
        arguments = self._arguments(group)
        counts = _sparse.row_counts(group, param, state)
        width = param.numel() // max(1, param.shape[0])  # a row: all dims after the first
        scalars = [arguments["lr"], arguments["eps"], arguments["weight_decay"],
                   -1.0 if arguments["maximize"] else 1.0, 0.0, 1.0, float(width)]
        mode = _MODE_CODES[arguments["mode"]]
        torch_ops = _sparse.kernel_or_rows("rowwise_adagrad", group, param, grad,
                                           [state["sum"].view(-1, 1)], scalars, counts, mode)
        if torch_ops is None:
            return
        rows, table, (sums,) = torch_ops
        touched, values = _sparse.coalesce(rows)
        weights = table.index_select(0, touched).to(sums.dtype)
        row_sums = sums.index_select(0, touched).view(-1)
        _rowwise_adagrad(weights, values.to(sums.dtype), row_sums, **arguments)
        sums.index_copy_(0, touched, row_sums.view(-1, 1))
        table.index_copy_(0, touched, weights.to(table.dtype))
        _sparse.count_touched(counts, touched, rows.num_rows)


def _rowwise_adagrad(table: Tensor, grad: Tensor, state_sum: Tensor, *, lr: float, eps: float,
                     weight_decay: float, mode: str, maximize: bool) -> None:
    """The update on rows ``table`` (``(rows, D)``, in place) and ``state_sum`` (``(rows,)``)."""
    if maximize:
        grad = -grad
    decayed = grad.add(table, alpha=weight_decay) if mode == "l2" else grad
    state_sum.add_(decayed.mul(decayed).sum(dim=1).div_(table.shape[1]))
    multiplier = (lr / state_sum.sqrt().add_(eps)).unsqueeze(1)
    if mode == "l2":
        table.mul_(multiplier.mul(-weight_decay).add_(1.0))
    elif mode == "decoupled":
        table.mul_(1.0 - lr * weight_decay)
    table.addcmul_(multiplier, grad, value=-1.0)
