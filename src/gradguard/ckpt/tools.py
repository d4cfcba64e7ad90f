"""The ``gradguard ckpt`` commands: list, inspect, verify. Read-only; each returns an exit code."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO

from . import signing
from .errors import CheckpointError
from .verify import inspect, list_checkpoints, verify


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"


def _metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in metrics.items()) or "-"


def list_command(root: str, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print the committed checkpoints under ``root``, oldest first."""
    out = out or sys.stdout
    rows = list_checkpoints(root)
    if as_json:
        print(json.dumps(rows, indent=1, default=str), file=out)
        return 0
    if not rows:
        print(f"no committed checkpoints under {root}", file=out)
        return 0
    print(f"{'STEP':>12}  {'CREATED':<24}  {'SIZE':>9}  {'SIGNED':<6}  METRICS", file=out)
    for row in rows:
        if "error" in row:
            print(f"{row['step']:>12}  unreadable manifest: {row['error']}", file=out)
            continue
        print(f"{row['step']:>12}  {row['created']!s:<24}  {_size(row['size_bytes']):>9}  "
              f"{'yes' if row['signed'] else 'no':<6}  {_metrics(row['metrics'])}", file=out)
    return 0


def inspect_command(path: str, *, as_json: bool = False, out: TextIO | None = None) -> int:
    """Print a checkpoint's step, versions, optimizer and its configuration, and sizes."""
    out = out or sys.stdout
    try:
        summary = inspect(path)
    except (CheckpointError, OSError) as err:
        print(f"cannot inspect {path}: {err}", file=out)
        return 1
    if as_json:
        print(json.dumps(summary, indent=1, default=str), file=out)
        return 0
    print(f"path:        {summary['path']}", file=out)
    print(f"step:        {summary['step']}", file=out)
    print(f"created:     {summary['created']}", file=out)
    print(f"format:      version {summary['format_version']}", file=out)
    print("versions:    " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()),
          file=out)
    print(f"signed:      {'yes, key id ' + summary['key_id'] if summary['signed'] else 'no'}",
          file=out)
    print(f"optimizer:   {summary['optimizer'] or '-'}", file=out)
    if summary["optimizer_config"]:
        for i, group in enumerate(summary["optimizer_config"]["param_groups"]):
            print(f"  group {i}:   " + ", ".join(f"{k}={_plain(v)}" for k, v in group.items()),
                  file=out)
        print(f"  config hash: {summary['optimizer_config_hash']}", file=out)
    print("components:  " + ", ".join(f"{k} ({v})" if v else k
                                      for k, v in summary["components"].items()), file=out)
    if summary["config"] is not None:
        print(f"run config:  {json.dumps(summary['config'])}", file=out)
    print(f"metrics:     {_metrics(summary['metrics'])}", file=out)
    print(f"size:        {_size(summary['size_bytes'])}", file=out)
    for name, record in summary["files"].items():
        print(f"  {name:<22} {_size(record['bytes']):>9}  {record['tensors']:>5} tensors  "
              f"sha256 {record['sha256'][:16]}…", file=out)
    return 0


def _plain(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        (tag, body), = value.items()
        if tag == "$tuple":
            return "(" + ", ".join(_plain(v) for v in body) + ")"
        if tag == "$float":
            return str(body)
    return json.dumps(value) if not isinstance(value, str) else value


def verify_command(path: str, *, key_file: str | None = None, out: TextIO | None = None) -> int:
    """Verify a checkpoint completely: 0 if it verifies, 1 (with every problem) if not."""
    out = out or sys.stdout
    try:
        key = signing.resolve_key(None, key_file)
        info = verify(path, signing_key=key)
    except (CheckpointError, OSError, ValueError) as err:
        problems = getattr(err, "problems", None) or [str(err)]
        print(f"FAILED {os.fspath(path)}", file=out)
        for problem in problems:
            print(f"  - {problem}", file=out)
        return 1
    checks = "sha256 of every file"
    if key is not None:
        checks += " and the signature"
    elif info.signed:
        checks += " (signed, but no key configured: signature not checked)"
    print(f"OK {info.path}: step {info.step}, {_size(info.size_bytes)}, {checks} verified",
          file=out)
    return 0
