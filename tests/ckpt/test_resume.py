"""Resume is bit-exact: N steps == N/2 steps, save, restore in a new process, N/2 steps.

For every optimizer in the gradguard registry and torch.optim's SGD, Adam and
Adagrad; with a shuffled DataLoader, dropout, numpy/python augmentation noise
and a warmup+cosine LR scheduler (see resume_worker.py). Parameters, optimizer
state (tensors with atol=0 and equal dtypes, everything else by repr), the
scheduler state and the next draws of every RNG must be identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import gradguard.optim as go

REPO = Path(__file__).resolve().parents[2]
SPECS = [f"gradguard:{name}" for name in go.available()] + [
    "torch:SGD", "torch:Adam", "torch:Adagrad"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    out = root / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for phase in ("first", "second"):  # two processes: the second only sees the checkpoints
        subprocess.run([sys.executable, "-m", "tests.ckpt.resume_worker", phase,
                        str(root / "ckpt"), str(out), *SPECS],
                       cwd=REPO, env=env, check=True, timeout=300)
    return out


@pytest.mark.parametrize("spec", SPECS)
def test_resume_in_a_new_process_is_bit_exact(spec: str, runs: Path) -> None:
    tag = spec.replace(":", "-")
    for phase in ("first", "second"):
        error = runs / f"{tag}-{phase}.error"
        if error.exists():
            pytest.fail(f"the {phase} half failed:\n{error.read_text()}")
    full = safetensors.torch.load_file(runs / f"{tag}-full.safetensors")
    resumed = safetensors.torch.load_file(runs / f"{tag}-resumed.safetensors")
    assert sorted(full) == sorted(resumed)
    assert any(k.startswith("state/") for k in full), "the optimizer kept no state"
    for key in full:
        assert full[key].dtype == resumed[key].dtype, key
        assert torch.equal(full[key], resumed[key]), f"{key} differs after resume"
    assert (json.loads((runs / f"{tag}-full.json").read_text())
            == json.loads((runs / f"{tag}-resumed.json").read_text()))
