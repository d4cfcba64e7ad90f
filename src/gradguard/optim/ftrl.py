"""FTRL-Proximal, per-coordinate (McMahan et al. 2013).

torch.optim has no FTRL. The arguments follow the paper's Algorithm 1
(``lr`` is its :math:`\\alpha`, ``beta`` its :math:`\\beta`, ``l1``/``l2`` its
:math:`\\lambda_1`/:math:`\\lambda_2`), plus ``initial_accumulator_value`` and
``maximize``. State keys: ``z`` and ``n`` (TensorFlow/Keras call them
``linear`` and ``accumulator``) and ``step`` (a 0-dim float32 counter).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from . import _sparse
from ._validation import FLAG, NON_NEGATIVE, POSITIVE, Rule
from .base import Optimizer, ParamsT, as_float, cpu_blocks, group_by_device_and_dtype


class FTRL(Optimizer):
    r"""FTRL-Proximal: per-coordinate follow-the-regularized-leader with L1/L2, sparse weights.

    For each coordinate :math:`w` of a parameter with gradient :math:`g`, keeping
    :math:`z` (initially 0) and :math:`n` (initially ``initial_accumulator_value``),
    at each step:

    .. math::
        g &\leftarrow -g \text{ if maximize} \\
        \sigma &= \left(\sqrt{n + g^2} - \sqrt{n}\right) / \alpha \\
        z &\leftarrow z + g - \sigma w \\
        n &\leftarrow n + g^2 \\
        w &\leftarrow \begin{cases}
            0 & \text{if } |z| \le \lambda_1 \\
            -\dfrac{z - \operatorname{sign}(z)\lambda_1}
                   {(\beta + \sqrt{n})/\alpha + \lambda_2} & \text{otherwise}
        \end{cases}

    The weights are a closed-form function of :math:`(z, n)`: coordinates with
    :math:`|z| \le \lambda_1` are exactly ``+0.0`` (true sparsity, not small
    values), which is what L1 buys here. Consequences worth knowing:

    * the **first step replaces the initial weights** by this closed form (as
      TensorFlow's FTRL does); the initial values only enter through
      :math:`\sigma w`. Start from zeros, or expect the jump;
    * ``l2`` is the paper's :math:`\lambda_2` (penalty :math:`\tfrac12\lambda_2 w^2`).
      TensorFlow/Keras's ``l2_regularization_strength`` is half of it, and Keras's
      ``beta`` enters as ``l2 + beta / (2 lr)``: Keras ``(l2=a, beta=b)`` equals
      ``FTRL(l2=2 * a, beta=b)`` here (with ``learning_rate_power=-0.5``);
    * ``beta`` keeps the denominator positive for a coordinate that has seen no
      gradient. With ``beta == 0`` and ``initial_accumulator_value == 0`` it
      would be 0, so that combination is refused.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\alpha > 0` (default 0.1).
        beta: :math:`\beta \ge 0` (default 1.0, the paper's usual value).
        l1: L1 strength :math:`\lambda_1 \ge 0` (default 0).
        l2: L2 strength :math:`\lambda_2 \ge 0` (default 0).
        initial_accumulator_value: initial :math:`n \ge 0` (default 0); must be
            > 0 when ``beta == 0``.
        maximize: ascend instead of descend (default False).
        impl: ``"auto"`` (= ``"foreach"``), ``"reference"`` or ``"foreach"``.
        state_dtype: dtype of ``z``/``n`` (default: float32 for half-precision
            parameters, else the parameter's dtype).
        count_row_updates: keep ``state["row_update_count"]`` (int64, one per row along
            dim 0), incremented for each row a step updates (default False).

    **Sparse gradients** (``nn.Embedding(sparse=True)``) update lazily, as FTRL does in
    click-prediction systems: duplicate rows are summed and the step above is applied
    to the touched rows only; every other row of the weights, ``z`` and ``n`` stays
    bit-identical. A row's first update replaces its initial weights (the dense
    step replaces all of them at the first step). With numba installed
    (``gradguard[fast]``) a compiled CPU kernel does the update (``impl="reference"``
    keeps the torch ops); see ``docs/embeddings.md``.

    Reference: McMahan et al., "Ad Click Prediction: a View from the Trenches",
    KDD 2013, Algorithm 1.
    """

    supported_impls: ClassVar[tuple[str, ...]] = ("reference", "foreach")
    sparse_gradients: ClassVar[bool] = True
    hyperparameter_rules: ClassVar[dict[str, Rule]] = {
        "lr": POSITIVE,
        "beta": NON_NEGATIVE,
        "l1": NON_NEGATIVE,
        "l2": NON_NEGATIVE,
        "initial_accumulator_value": NON_NEGATIVE,
        "maximize": FLAG,
        "count_row_updates": FLAG,
    }

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 0.1,
        beta: float = 1.0,
        l1: float = 0.0,
        l2: float = 0.0,
        initial_accumulator_value: float = 0.0,
        *,
        maximize: bool = False,
        impl: str = "auto",
        state_dtype: torch.dtype | str | None = None,
        count_row_updates: bool = False,
    ) -> None:
        defaults = {
            "lr": lr,
            "beta": beta,
            "l1": l1,
            "l2": l2,
            "initial_accumulator_value": initial_accumulator_value,
            "maximize": maximize,
            "count_row_updates": count_row_updates,
        }
        super().__init__(params, defaults, impl=impl, state_dtype=state_dtype)

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if float(group["beta"]) == 0 and float(group["initial_accumulator_value"]) == 0:
            raise ValueError(
                "beta=0 with initial_accumulator_value=0 divides by zero for a coordinate "
                "that has seen no gradient: allowed is beta > 0 or "
                "initial_accumulator_value > 0")

    def _init_state(self, group: dict[str, Any], p: Tensor, state: dict[str, Any],
                    dtype: torch.dtype, impl: str) -> None:
        state["step"] = self.step_counter(p, impl)
        state["z"] = self.zeros_like(p, dtype)
        state["n"] = torch.full_like(p, float(group["initial_accumulator_value"]), dtype=dtype,
                                     memory_format=torch.preserve_format)
        _sparse.row_counts(group, p, state)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                states: list[dict[str, Any]], impl: str) -> None:
        for p, state in zip(params, states, strict=True):
            _sparse.count_all_rows(_sparse.row_counts(group, p, state))
        _IMPLS[impl](
            params,
            grads,
            [s["z"] for s in states],
            [s["n"] for s in states],
            [s["step"] for s in states],
            lr=as_float(group["lr"]),
            beta=float(group["beta"]),
            # + 0.0 turns a -0.0 into +0.0, so the thresholds below are never -0.0
            l1=float(group["l1"]) + 0.0,
            l2=float(group["l2"]),
            maximize=group["maximize"],
        )

    def _update_sparse(self, group: dict[str, Any], param: Tensor, grad: Tensor,
                       state: dict[str, Any]) -> None:
        _sparse.advance(state["step"])
        counts = _sparse.row_counts(group, param, state)
        lr, beta = as_float(group["lr"]), float(group["beta"])
        l1, l2 = float(group["l1"]) + 0.0, float(group["l2"])
        scalars = [lr, 1 / lr, beta + lr * l2, l1, -1.0 if group["maximize"] else 1.0]
        torch_ops = _sparse.kernel_or_rows("ftrl", group, param, grad, [state["z"], state["n"]],
                                           scalars, counts)
        if torch_ops is not None:
            rows, table, (zs, ns) = torch_ops
            touched = _sparse_ftrl(table, zs, ns, rows, lr=lr, beta=beta, l1=l1, l2=l2,
                                   maximize=group["maximize"])
            _sparse.count_touched(counts, touched, rows.num_rows)


def _sparse_ftrl(table: Tensor, zs: Tensor, ns: Tensor, grad: _sparse.RowGrad, *, lr: float,
                 beta: float, l1: float, l2: float, maximize: bool) -> Tensor:
    """The reference step on the touched rows of ``table`` (the parameter as rows),
    ``zs`` and ``ns``, with torch ops; returns the touched rows."""
    rows, values = _sparse.coalesce(grad)
    z, n = zs.index_select(0, rows), ns.index_select(0, rows)
    weights = table.index_select(0, rows).to(zs.dtype)
    _reference_ftrl([weights], [values.to(zs.dtype)], [z], [n], [torch.zeros(())], lr=lr,
                    beta=beta, l1=l1, l2=l2, maximize=maximize)
    zs.index_copy_(0, rows, z)
    ns.index_copy_(0, rows, n)
    table.index_copy_(0, rows, weights.to(table.dtype))
    return rows


def _reference_ftrl(params: list[Tensor], grads: list[Tensor], zs: list[Tensor],
                    ns: list[Tensor], steps: list[Tensor], *, lr: float, beta: float, l1: float,
                    l2: float, maximize: bool) -> None:
    for i, param in enumerate(params):
        grad, z, n = grads[i], zs[i], ns[i]
        steps[i] += 1

        sqrt_n_old = n.sqrt()
        n.addcmul_(grad, grad)
        sqrt_n = n.sqrt()
        # z <- z + g - sigma * w, sigma = (sqrt(n_new) - sqrt(n_old)) / lr
        minus_lr_sigma = sqrt_n_old.sub_(sqrt_n)
        if maximize:
            z.sub_(grad)
        else:
            z.add_(grad)
        z.addcmul_(minus_lr_sigma, param, value=1 / lr)
        # w <- -(z - sign(z) l1) / ((beta + sqrt(n)) / lr + l2)
        #    = lr (sign(z) l1 - z) / (beta + sqrt(n) + lr l2)     where |z| > l1, else 0
        shrunk = z.sign().mul_(l1).sub_(z)
        weight = shrunk.mul_(lr).div_(sqrt_n.add_(beta + lr * l2))
        param.copy_(torch.where(z.abs() <= l1, 0.0, weight))


def _foreach_ftrl(params: list[Tensor], grads: list[Tensor], zs: list[Tensor],
                  ns: list[Tensor], steps: list[Tensor], *, lr: float, beta: float, l1: float,
                  l2: float, maximize: bool) -> None:
    # The reference's arithmetic in twelve passes; on the CPU they run block by
    # block so that all of them hit the cache (see cpu_blocks). The soft threshold
    # sign(z) l1 - z where |z| > l1, else 0, is clamp(z, -l1, l1) - z: the same
    # value outside the band and x - x = +0.0 inside it, so the zeros are exact
    # +0.0 without a mask, and stay +0.0 through 0 + lr * 0 / denom.
    lower = -l1 if l1 > 0 else 0.0
    for _, (d_params, d_grads, d_zs, d_ns, d_steps) in group_by_device_and_dtype(
            params, grads, zs, ns, steps):
        torch._foreach_add_(d_steps, 1)
        lists = [d_params, d_grads, d_zs, d_ns]
        for (b_params, b_grads, b_zs, b_ns), _ in cpu_blocks(lists):
            minus_lr_sigma = torch._foreach_sqrt(b_ns)
            torch._foreach_addcmul_(b_ns, b_grads, b_grads)
            denom = torch._foreach_sqrt(b_ns)
            torch._foreach_sub_(minus_lr_sigma, denom)
            if maximize:
                torch._foreach_sub_(b_zs, b_grads)
            else:
                torch._foreach_add_(b_zs, b_grads)
            torch._foreach_addcmul_(b_zs, minus_lr_sigma, b_params, value=1 / lr)
            del minus_lr_sigma

            torch._foreach_add_(denom, beta + lr * l2)
            shrunk = torch._foreach_clamp_max(b_zs, l1)
            torch._foreach_clamp_min_(shrunk, lower)
            torch._foreach_sub_(shrunk, b_zs)
            torch._foreach_zero_(b_params)
            torch._foreach_addcdiv_(b_params, shrunk, denom, value=lr)


_IMPLS = {"reference": _reference_ftrl, "foreach": _foreach_ftrl}
