"""``torchrun --nproc_per_node 2 -m gradguard train CONFIG``: a worker killed mid-run, resumed.

The launcher is torch's own (``python -m torch.distributed.run``, what the
``torchrun`` script runs), on a free port (``--standalone``), with
``--max-restarts 1``: when rank 1 SIGKILLs itself at step 70, torchrun stops
rank 0 and starts both again; ``--resume`` makes them continue from the last
checkpoint rank 0 committed. The result must equal, bit for bit, the
uninterrupted 2-process run of the same config (``equal-adam`` in conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gradguard.run import config
from tests.dist import harness
from tests.dist.conftest import reference_config


def test_torchrun_kill_one_worker_and_resume_equals_the_uninterrupted_run(
        suite: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg_file = tmp_path / "digits.toml"
    cfg_file.write_text(config.dumps(reference_config(run)))
    marker = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(harness.ROOT), "GG_TEST_KILL": f"1:70:{marker}",
           "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    process = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--max-restarts", "1", "--monitor-interval", "0.5",
         "-m", "gradguard", "train", str(cfg_file), "-q", "--resume"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    assert marker.exists()  # rank 1 was killed once
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 2 and kinds.count("resume") == 1
    resumed_at = next(e for e in events if e["event"] == "resume")["checkpoint_step"]
    assert 40 <= resumed_at < 70
    assert kinds[-1] == "finished" and events[-1]["status"] == "finished"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 200 and summary["dist"]["replicas_consistent"] is True
    assert harness.identical(harness.final_parameters(run),
                             harness.final_parameters(suite / "equal-adam"))
