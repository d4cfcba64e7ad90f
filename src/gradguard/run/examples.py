"""``gradguard config example WORKLOAD``: a commented config that runs as printed."""

from __future__ import annotations

from typing import Any

from gradguard.run.config import _value

_OPTIMIZERS: dict[str, str] = {
    "ctr": """\
# A hybrid: row-wise Adagrad on the embedding tables (one accumulator per row,
# sparse row updates), AdamW on the dense layers.
[optimizer.groups.embeddings]
name = "rowwise_adagrad"
params = "embeddings"      # "embeddings", "dense", "all", or ["glob*", ...] over parameter names
lr = 0.05

[optimizer.groups.dense]
name = "adamw"
params = "dense"
lr = 0.002
weight_decay = 0.0
""",
    "digits": """\
[optimizer]
name = "adam"              # `gradguard optimizers` lists every name and its hyperparameters
lr = 0.003
""",
    "mnist1d": """\
[optimizer]
name = "adam"              # the MNIST-1D paper's optimizer
lr = 0.01
""",
    "quadratic": """\
[optimizer]
name = "nonlinear_cg"      # full-batch: gradient_descent, nonlinear_cg, newton (or any other)
beta = "polak_ribiere"
gtol = 1e-10
""",
    "rosenbrock": """\
[optimizer]
name = "newton"            # full-batch: gradient_descent, nonlinear_cg, newton (or any other)
gtol = 1e-10
""",
}

_TRAIN: dict[str, dict[str, Any]] = {
    "ctr": {"steps": 1500, "batch_size": 512, "eval_every": 250},
    "digits": {"steps": 1000, "batch_size": 64, "eval_every": 100},
    "mnist1d": {"steps": 6000, "batch_size": 100, "eval_every": 500},
    "quadratic": {"steps": 200, "batch_size": 1, "eval_every": 10},
    "rosenbrock": {"steps": 200, "batch_size": 1, "eval_every": 10},
}


def example(workload: str) -> str:
    """A commented TOML config for a built-in workload (or a user factory's import path)."""
    from gradguard.run import workloads

    builtin = ":" not in workload
    if builtin and workload not in workloads.available():
        raise ValueError(f"unknown workload {workload!r}; allowed: "
                         f"{', '.join(workloads.available())}, or 'package.module:factory'")
    options = workloads.options(workload) if builtin else {}
    train = _TRAIN.get(workload, {"steps": 1000, "batch_size": 128, "eval_every": 100})
    full_batch = workload in ("quadratic", "rosenbrock")
    lines = [
        f"# gradguard run configuration: workload {workload!r}.",
        "# Check it: gradguard config check FILE     Run it: gradguard train FILE",
        "# Every key is documented in docs/run.md; unknown keys are errors.",
        "",
        "[run]",
        f'output = "runs/{workload.replace(":", "-").replace(".", "-")}"'
        "   # the run directory (refused if it exists, unless --resume/--overwrite)",
        "seed = 0",
        'device = "cpu"             # "cpu", "cuda", "cuda:N"',
        f'precision = "{"fp64" if full_batch else "fp32"}"'
        '          # "fp32", "bf16" (autocast), "fp64"',
        "deterministic = false",
        "threads = 1                # small models: one thread, no OpenMP spinning on shared cores",
        "",
        "[workload]",
        f'name = "{workload}"',
    ]
    if options:
        lines += ["", "[workload.options]            # the workload's options and their defaults"]
        lines += [f"{k} = {_value(v)}" for k, v in options.items() if v is not None]
    lines += ["", _OPTIMIZERS.get(workload, _OPTIMIZERS["digits"]).rstrip(), ""]
    lines += ["[schedule]                    # any torch.optim.lr_scheduler by name, with warm-up",
              '# name = "CosineAnnealingLR"  # T_max defaults to the steps after warm-up',
              "warmup_steps = 0", ""]
    lines += ["[train]"]
    lines += [f"{k} = {_value(v)}" for k, v in train.items()]
    lines += ["grad_accumulation = 1",
              "log_every = 10",
              "# [train.early_stopping]   # stop after `patience` evaluations without gain",
              "# patience = 5", ""]
    lines += ["[guard]                       # skip non-finite steps, spikes; see docs/guard.md",
              "enabled = true", "",
              "[guard.policy]",
              "# clip_norm = 1.0", "",
              "[recorder]                    # metrics.jsonl always; add TensorBoard, Prometheus",
              "every = 10", "full_every = 100",
              "# prometheus_port = 9464", "",
              "[checkpoint]                  # atomic, verified; every defaults to eval_every",
              "keep_last = 3", "keep_best = 1", ""]
    return "\n".join(lines)
