"""gradguard.compare: evidence for optimizer choices.

* :func:`run_compare` / ``gradguard compare``: every (optimizer, seed) pair as
  its own run, in parallel worker processes, resumable; a summary with 95%
  intervals, time-to-target, stability, cost and pairwise tests in words
  (:mod:`.stats`), a JSON file and an HTML report (:mod:`.report`).
* :func:`evaluate_checkpoint`, :func:`gate` / ``gradguard gate``: two
  checkpoints on the same evaluation data (its content hash recorded), per
  metric and per slice, with each one's optimizer lineage; fails on a regression
  beyond a threshold.
* :func:`run_sweep` / ``gradguard sweep``: an Optuna study over a search-space
  TOML, stored in SQLite by default, pruned on intermediate evaluations,
  continuing after a kill; the best config written as a runnable TOML.

See docs/compare.md.
"""

from gradguard.compare.experiment import (
    CompareError,
    CompareResult,
    Variant,
    parse_variants,
    run_compare,
    summarize,
)
from gradguard.compare.gate import (
    Evaluation,
    GateError,
    GateResult,
    Threshold,
    evaluate_checkpoint,
    gate,
    load_evaluation,
    metric_direction,
)
from gradguard.compare.runs import EvalPoint, RunOutcome, eval_timeline, read_run
from gradguard.compare.sweep import SearchSpace, SweepError, SweepResult, load_space, run_sweep

__all__ = [
    "CompareError",
    "CompareResult",
    "EvalPoint",
    "Evaluation",
    "GateError",
    "GateResult",
    "RunOutcome",
    "SearchSpace",
    "SweepError",
    "SweepResult",
    "Threshold",
    "Variant",
    "eval_timeline",
    "evaluate_checkpoint",
    "gate",
    "load_evaluation",
    "load_space",
    "metric_direction",
    "parse_variants",
    "read_run",
    "run_compare",
    "run_sweep",
    "summarize",
]
