"""The layout of a run directory (what `gradguard train` leaves behind).

::

    RUN_DIR/
      config.toml          the run's configuration, as validated (every default filled in)
      env.json             library, torch, python, platform, device, threads, start time
      metrics.jsonl        the flight recorder's JSONL (gradguard.watch schema 1), plus the
                           loop's own values through ``Recorder.log`` (group "all"):
                           ``loss`` every ``log_every`` steps, ``eval_<metric>`` at each
                           evaluation (and ``eval_<slice>_<metric>`` per slice),
                           ``epoch``, ``samples_seen``
      events.jsonl         the run's timeline, one JSON object per line (see EVENT_KINDS)
      guard.jsonl          the guard's audit log (gradguard.guard)
      checkpoints/         the Checkpointer root (its own audit.jsonl inside)
      summary.json         written at the end: final/best metrics, steps, seconds, status
      report.html          the self-contained report (gradguard.report)

Every event has ``time`` (ISO-8601 UTC), ``wall_time`` (Unix seconds), ``step``
and ``event`` (one of :data:`EVENT_KINDS`), plus fields per kind.
"""

from __future__ import annotations

CONFIG = "config.toml"
ENV = "env.json"
METRICS = "metrics.jsonl"
EVENTS = "events.jsonl"
GUARD_AUDIT = "guard.jsonl"
CHECKPOINTS = "checkpoints"
SUMMARY = "summary.json"
REPORT = "report.html"

EVENT_KINDS = {
    "start": "training starts (fields: workload, optimizer, steps, resumed_from)",
    "eval": "an evaluation (fields: metrics {name: value}, seconds)",
    "checkpoint": "a checkpoint committed (fields: path, metrics)",
    "resume": "the run resumed from a checkpoint (fields: path, checkpoint_step)",
    "restore_fidelity": "evaluation before the save vs after the restore "
                        "(fields: metric, before, after, delta)",
    "target_reached": "the primary metric reached the workload's target (fields: metric, value, "
                      "target, seconds)",
    "early_stop": "early stopping (fields: metric, best, best_step, patience)",
    "guard": "a guard action other than a plain skip (fields: action, detector, message)",
    "checkpoint_failed": "a save failed; training goes on and the next save retries "
                         "(fields: error)",
    "interrupted": "Ctrl-C / SIGTERM: a checkpoint was saved and the run stopped (fields: signal)",
    "halted": "the guard stopped training (fields: diagnosis)",
    "finished": "training ended (fields: status, steps, seconds)",
}
