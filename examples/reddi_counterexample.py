"""Reddi, Kale & Kumar (ICLR 2018): Adam converges to the worst point; AMSGrad does not.

The online problem of their Theorem 1: on the feasible set F = [-1, 1], the loss
at step t is

    f_t(x) = C x   if t mod 3 == 1
    f_t(x) = -x    otherwise,              with C > 2 (here C = 3).

Over each period of three steps the total loss is (C - 2) x, so the best point is
x = -1. Adam with beta1 = 0 and beta2 = 1 / (1 + C^2), step size alpha / sqrt(t)
and projection onto F, sees the large gradient C once every three steps; its
second-moment average forgets it quickly, the two small gradients -1 then take
large steps, and x drifts to +1: the *worst* point, with average regret
2(C - 2)/3 per step that never vanishes. AMSGrad (``amsgrad=True``) keeps the
running maximum of v, so the step after a large gradient stays small, and x
goes to -1.

This script runs both with gradguard's Adam (``gradguard.optim.Adam``, the
update rule in its docstring), prints where each ends and its average regret,
and asserts Adam's x > 0.9 and AMSGrad's x < -0.9.

Run: ``python examples/reddi_counterexample.py`` (about two seconds).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from gradguard.optim import Adam

C = 3.0


def loss_gradient(t: int, c: float = C) -> float:
    """d f_t / dx: C on steps t = 1, 4, 7, ... and -1 on the others."""
    return c if t % 3 == 1 else -1.0


def run(*, amsgrad: bool, steps: int, alpha: float = 0.5, c: float = C) -> tuple[float, float]:
    """Online Adam / AMSGrad from x = 0; returns the final x and the average regret."""
    x = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    optimizer = Adam([x], lr=alpha, betas=(0.0, 1.0 / (1.0 + c * c)), eps=1e-8,
                     amsgrad=amsgrad)
    regret = 0.0
    for t in range(1, steps + 1):
        g = loss_gradient(t, c)
        regret += g * (x.item() - (-1.0))  # f_t is linear: f_t(x) - f_t(x*) = g (x - x*)
        optimizer.param_groups[0]["lr"] = alpha / math.sqrt(t)
        optimizer.zero_grad()
        x.grad = torch.tensor([g], dtype=torch.float64)
        optimizer.step()
        with torch.no_grad():
            x.clamp_(-1.0, 1.0)  # projection onto F = [-1, 1]
    return x.item(), regret / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args(argv)
    adam_x, adam_regret = run(amsgrad=False, steps=args.steps)
    ams_x, ams_regret = run(amsgrad=True, steps=args.steps)
    print(f"f_t(x) = {C:g}x if t mod 3 == 1 else -x on [-1, 1]; the optimum is x = -1")
    print(f"Adam     after {args.steps} steps: x = {adam_x:+.4f}, average regret "
          f"{adam_regret:.4f} (Theorem 1: stays near 2(C-2)/3 = {2 * (C - 2) / 3:.4f})")
    print(f"AMSGrad  after {args.steps} steps: x = {ams_x:+.4f}, average regret "
          f"{ams_regret:.4f} (goes to 0)")
    assert adam_x > 0.9, f"Adam should drift to the wrong end, x = +1; got {adam_x}"
    assert ams_x < -0.9, f"AMSGrad should converge to the optimum x = -1; got {ams_x}"
    assert adam_regret > 10 * ams_regret
    print("Adam converges to the worst point of F; AMSGrad to the optimum. As published.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
