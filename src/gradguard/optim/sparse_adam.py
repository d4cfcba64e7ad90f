"""SparseAdam: lazy Adam for sparse gradients (embedding tables).

Drop-in for ``torch.optim.SparseAdam``: same arguments, defaults, param-group
keys (plus ``impl``, ``state_dtype`` and ``count_row_updates``) and state keys
(``step``, ``exp_avg``, ``exp_avg_sq``). ``step`` is a 0-dim float64 tensor where
torch keeps an int: torch computes its bias corrections in the counter's dtype
when handed a tensor, and float64 keeps them exact, so state dicts move both
ways with identical next steps.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _sparse
from ._validation import FLAG, NON_NEGATIVE, POSITIVE, UNIT_HALF_OPEN, Pair, Rule
from .base import Optimizer, ParamsT, as_float


class SparseAdam(Optimizer):
    r"""Lazy Adam: moments and weights of the rows a sparse gradient touches, and no others.

    For each parameter with a sparse gradient at its step :math:`t = 1, 2, \dots`
    (counted per parameter, every step it has a gradient), duplicate rows are summed
    into :math:`g`, and for each touched coordinate only:

    .. math::
        g &\leftarrow -g \text{ if maximize} \\
        m &\leftarrow m + (1-\beta_1)(g - m) \qquad
        v \leftarrow v + (1-\beta_2)(g^2 - v) \\
        \theta &\leftarrow \theta - \frac{\gamma\sqrt{1-\beta_2^t}}{1-\beta_1^t}
            \cdot \frac{m}{\sqrt{v} + \epsilon}

    (torch.optim.SparseAdam's arithmetic, operation for operation). Every other
    row of the parameter and of ``exp_avg``/``exp_avg_sq`` stays bit-identical: an
    untouched row's moments do not decay, and the bias correction uses the
    parameter's step count, not the row's. A gradient with no entries advances the
    step and changes nothing else, as in torch.

    Dense gradients are refused (use :class:`~gradguard.optim.Adam`/``AdamW`` for
    dense parameters, e.g. in a :class:`~gradguard.optim.hybrid.Hybrid`).

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma` (default 1e-3), ``>= 0`` (torch requires
            ``> 0`` at construction; 0 is accepted here, as schedulers may reach it).
        betas: :math:`(\beta_1, \beta_2)`, each in ``[0, 1)`` (default (0.9, 0.999)).
        eps: :math:`\epsilon > 0` (default 1e-8).
        maximize: ascend instead of descend (default False).
        impl: ``"auto"`` (the compiled kernel when numba is installed and the tensors
            allow, else torch ops) or ``"reference"`` (torch ops).
        state_dtype: dtype of ``exp_avg``/``exp_avg_sq`` (default: float32 for
            half-precision parameters, else the parameter's dtype).
        count_row_updates: keep ``state["row_update_count"]`` (int64, one per row along
            dim 0), incremented for each row a step updates (default False).

    Reference: Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015;
    the lazy variant is torch.optim.SparseAdam's (and TensorFlow's LazyAdam).
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference",)
    sparse_gradients: ClassVar[bool] = True
    dense_gradients: ClassVar[bool] = False
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": NON_NEGATIVE,
        "betas": Pair(UNIT_HALF_OPEN, UNIT_HALF_OPEN),
        "eps": POSITIVE,
        "maximize": FLAG,
        "count_row_updates": FLAG,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        maximize: bool = False,
        *,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
        count_row_updates: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "eps": eps,
            "maximize": maximize,
            "count_row_updates": count_row_updates,
        }
        super().__init__(params, defaults, impl=impl, state_dtype=state_dtype)

    def _check_gradients(self, group: dict[str, Any], params: list[Tensor],
                         grads: list[Tensor]) -> None:
        for p, g in zip(params, grads, strict=True):
            if not g.is_sparse:
                raise RuntimeError(
                    f"SparseAdam got a dense gradient for {_sparse.describe(self, group, p)}; "
                    "it takes sparse gradients only (nn.Embedding(sparse=True), "
                    "nn.EmbeddingBag(sparse=True)). Use Adam or AdamW for dense parameters, "
                    "for example in a Hybrid optimizer (gradguard.optim.hybrid)")

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float64)
        state["exp_avg"] = self.zeros_like(p, dtype)
        state["exp_avg_sq"] = self.zeros_like(p, dtype)
        _sparse.row_counts(group, p, state)

    def _update_sparse(self, group: dict[str, Any], param: Tensor, grad: Tensor,
                       state: dict[str, Any]) -> None:
        if state["step"].dtype != torch.float64:  # loaded from a torch.optim state dict
            state["step"] = state["step"].to(torch.float64)
        _sparse.advance(state["step"])
        if grad._nnz() == 0:
            return
        step = state["step"].item()
        beta1, beta2 = (float(b) for b in group["betas"])
        step_size = as_float(group["lr"]) * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        counts = _sparse.row_counts(group, param, state)
        scalars = [1 - beta1, 1 - beta2, float(group["eps"]), -step_size,
                   -1.0 if group["maximize"] else 1.0]
        torch_ops = _sparse.kernel_or_rows("sparse_adam", group, param, grad,
                                           [state["exp_avg"], state["exp_avg_sq"]], scalars,
                                           counts)
        if torch_ops is not None:
            rows, table, (exp_avg, exp_avg_sq) = torch_ops
            touched = _sparse_adam(table, exp_avg, exp_avg_sq, rows, beta1=beta1, beta2=beta2,
                                   eps=group["eps"], step_size=step_size,
                                   maximize=group["maximize"])
            _sparse.count_touched(counts, touched, rows.num_rows)


def _sparse_adam(table: Tensor, exp_avgs: Tensor, exp_avg_sqs: Tensor, grad: _sparse.RowGrad,
                 *, beta1: float, beta2: float, eps: float, step_size: float,
                 maximize: bool) -> Tensor:
    """torch.optim.SparseAdam's step with torch ops, on the touched rows of ``table`` (the
    parameter as rows) and the moments; returns the touched rows."""
    rows, grads = _sparse.coalesce(grad)
    grads = grads.to(exp_avgs.dtype)
    if maximize:
        grads.neg_()
    exp_avg, exp_avg_sq = exp_avgs.index_select(0, rows), exp_avg_sqs.index_select(0, rows)
    # old <- b * old + (1 - b) * new, as old += (1 - b) * (new - old)
    exp_avg_step = grads.sub(exp_avg).mul_(1 - beta1)
    exp_avg_sq_step = grads.pow(2).sub_(exp_avg_sq).mul_(1 - beta2)
    exp_avgs.index_copy_(0, rows, exp_avg + exp_avg_step)
    exp_avg_sqs.index_copy_(0, rows, exp_avg_sq + exp_avg_sq_step)
    numer = exp_avg_step.add_(exp_avg)
    denom = exp_avg_sq_step.add_(exp_avg_sq).sqrt_().add_(eps)
    params = table.index_select(0, rows).to(exp_avgs.dtype)
    params.add_(numer.div_(denom).mul_(-step_size))
    table.index_copy_(0, rows, params.to(table.dtype))
    return rows
