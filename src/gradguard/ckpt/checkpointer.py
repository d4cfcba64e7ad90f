"""The Checkpointer: save, find the newest good checkpoint, restore, retain.

::

    ckpt = Checkpointer("runs/a", keep_last=3, keep_best=("val_loss", "min"))
    info = ckpt.restore(model=model, optimizer=opt, scheduler=sched) if ckpt.latest() else None
    for step in range(start, steps):
        ...
        if step % 100 == 0:
            ckpt.save_async(step, model=model, optimizer=opt, scheduler=sched,
                            data_position={"epoch": epoch, "batch": i}, metrics={"loss": loss})
    ckpt.wait()

A save captures the model's and optimizer's state dicts (step counters at their
own dtype), the LR scheduler, the GradScaler, every RNG state, the caller's data
position, run config, extra values and metrics, the library versions and the
optimizer configuration hash; it is committed atomically (see
:mod:`gradguard.ckpt.commit`), then the retention rules run. Restores verify
first and load nothing until the checkpoint is known to fit.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import safetensors
import torch
from torch import Tensor

import gradguard

from . import signing
from .audit import AUDIT_FILE, AuditLog
from .commit import CommitProtocol, protocol_for, split_location, step_name, step_of
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CheckpointWriteError,
    OptimizerConfigMismatchError,
)
from .format import (
    DTYPES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MODEL_FILE,
    OPTIMIZER_FILE,
    RUN_FILE,
    FileRecord,
    TreeEncoder,
    decode_tree,
    dump_manifest,
    host_contiguous,
    manifest_digest,
    write_safetensors,
)
from .state import (
    capture_rng,
    changed_keys,
    config_differences,
    config_hash,
    model_differences,
    optimizer_config,
    optimizer_differences,
    optimizer_structure,
    qualified_name,
    restore_rng,
)
from .verify import CheckpointInfo, LoadedCheckpoint, load_verified, read_manifest

_PARALLEL_BYTES = 1 << 24  # files at least this large are written concurrently

RUN_COMPONENTS: tuple[str, ...] = ("scheduler", "scaler", "rng", "data_position", "extra",
                                   "config")
"""Components stored in ``run.safetensors`` (tensors) and the manifest (the rest)."""


_COPY_CHUNK = 8 << 20
"""Bytes per memcpy task of a snapshot: small enough to balance the cores, large enough that
the per-task overhead stays below 1% at memory bandwidth."""

STREAM_COPY_BYTES = 32 << 20
"""Snapshots at least this large are copied with streaming stores when numba is installed
(:mod:`gradguard.ckpt._stream_copy`): they do not fit in the caches, and streaming
stores skip reading each destination line first. Smaller ones use ``np.copyto``."""


def _parallel_memcpy(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """``dst[:] = src`` for byte arrays, in chunks over the machine's cores.

    The copies release the GIL, so the threads copy at once: a snapshot is a
    memory-bandwidth copy, and one core does not saturate the memory bus.
    """
    total = sum(len(dst) for dst, _ in pairs)
    copy = (_stream_copy() if total >= STREAM_COPY_BYTES else None) or np.copyto
    tasks = [(dst[i:i + _COPY_CHUNK], src[i:i + _COPY_CHUNK])
             for dst, src in pairs for i in range(0, len(dst), _COPY_CHUNK)]
    workers = min(len(tasks), os.cpu_count() or 1, 8)
    if workers <= 1:
        for dst, src in tasks:
            copy(dst, src)
        return
    for _ in _copy_pool().map(lambda task: copy(task[0], task[1]), tasks):
        pass


@functools.cache
def _copy_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(min(os.cpu_count() or 1, 8), thread_name_prefix="gradguard-copy")


@functools.cache
def _stream_copy() -> Callable[[np.ndarray, np.ndarray], None] | None:
    """The streaming-store copy, compiled (or loaded from numba's cache) on first use;
    None without numba, or where it does not compile (then ``np.copyto`` is used)."""
    if importlib.util.find_spec("numba") is None:
        return None
    try:
        from gradguard.ckpt._stream_copy import stream_copy
        probe = np.arange(256, dtype=np.uint8)
        out = np.zeros_like(probe)
        stream_copy(out[1:], probe[1:])
    except Exception as err:  # numba present but unusable here: the plain copy still works
        warnings.warn(f"gradguard: streaming snapshot copy unavailable ({type(err).__name__}: "
                      f"{err}); using np.copyto", RuntimeWarning, stacklevel=2)
        return None
    if not np.array_equal(out[1:], probe[1:]):
        return None
    return stream_copy


@dataclass(frozen=True)
class KeepBest:
    """Retention rule: keep the ``count`` checkpoints with the best ``metric``.

    ``mode`` is ``"min"`` (lower is better, e.g. a loss) or ``"max"``. Checkpoints
    saved without the metric, or with a NaN value, are never "best".
    """

    metric: str
    mode: Literal["min", "max"] = "min"
    count: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"invalid keep_best mode={self.mode!r}: allowed are 'min', 'max'")
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"invalid keep_best count={self.count!r}: must be an int >= 1")


KeepBestSpec = KeepBest | str | tuple[str, str] | tuple[str, str, int]


def _keep_best(spec: KeepBestSpec | None) -> KeepBest | None:
    if spec is None or isinstance(spec, KeepBest):
        return spec
    if isinstance(spec, str):
        return KeepBest(spec)
    if isinstance(spec, tuple) and 2 <= len(spec) <= 3:
        return KeepBest(*spec)
    raise ValueError(f"invalid keep_best={spec!r}: use KeepBest(metric, mode, count), a metric "
                     "name, or a tuple (metric, 'min'|'max'[, count])")


def _positive_or_none(name: str, value: int | None) -> int | None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"invalid {name}={value!r}: must be None or an int >= 1")
    return value


@dataclass
class _Payload:
    """One checkpoint, captured: JSON components and host tensors per file."""

    step: int
    components: dict[str, dict[str, Any]]
    files: dict[str, dict[str, Tensor]]
    metrics: dict[str, Any]
    asynchronous: bool
    blocking_seconds: float = 0.0


class Checkpointer:
    """Atomic, verified, pickle-free checkpoints of a training run under ``root``.

    Args:
        root: a local directory, or an fsspec URL (``s3://bucket/run``,
            ``memory://run``); objects stores use a commit marker.
        keep_last: keep the newest ``keep_last`` checkpoints (None: no limit).
        keep_every: also keep every checkpoint whose step is a multiple of it.
        keep_best: also keep the best ones by a metric: ``KeepBest("val_loss",
            "min", 2)``, or ``("val_loss", "min")``, or just ``"val_loss"``.
            A checkpoint is kept if any rule keeps it; the newest is always kept;
            with all three None nothing is ever deleted.
        config: the run configuration stored in every checkpoint (any JSON-like
            value; ``save(config=...)`` overrides it).
        signing_key, signing_key_file: the HMAC key (else ``GRADGUARD_CKPT_KEY``
            / ``GRADGUARD_CKPT_KEY_FILE``); with a key, every save is signed and
            unsigned or mis-signed checkpoints are refused.
        audit: append every save, restore and refusal to ``<root>/audit.jsonl``.
        commit: the commit protocol (default: by kind of storage).
        cleanup: remove what interrupted saves left behind, now (one writer per root).
    """

    def __init__(self, root: str | os.PathLike[str], keep_last: int | None = 3,
                 keep_every: int | None = None, keep_best: KeepBestSpec | None = None, *,
                 config: Any = None, signing_key: bytes | str | None = None,
                 signing_key_file: str | os.PathLike[str] | None = None, audit: bool = True,
                 commit: CommitProtocol | None = None, cleanup: bool = True) -> None:
        self.keep_last = _positive_or_none("keep_last", keep_last)
        self.keep_every = _positive_or_none("keep_every", keep_every)
        self.keep_best = _keep_best(keep_best)
        self.config = config
        self.protocol = commit if commit is not None else protocol_for(root)
        self.root = self.protocol.location("").rstrip("/")
        self._key = signing.resolve_key(signing_key, signing_key_file)
        self.audit = AuditLog(
            (lambda data: self.protocol.append(AUDIT_FILE, data)) if audit else None)
        self._thread: threading.Thread | None = None
        self._error: tuple[int, BaseException] | None = None
        self._last_info: CheckpointInfo | None = None
        self._buffers: dict[tuple[str, str], Tensor] = {}
        self._metric_cache: dict[str, dict[str, Any]] = {}
        if cleanup:
            removed = self.protocol.cleanup()
            if removed:
                self.audit.record("cleanup", removed=removed,
                                  reason="left behind by an interrupted save or delete")

    def __repr__(self) -> str:
        return (f"Checkpointer({self.root!r}, keep_last={self.keep_last}, "
                f"keep_every={self.keep_every}, keep_best={self.keep_best}, "
                f"protocol={self.protocol.kind!r}, signed={self._key is not None})")

    # ================================================================== saving
    def save(self, step: int, *, model: torch.nn.Module | None = None,
             optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
             scaler: Any = None, extra: Any = None, metrics: Mapping[str, Any] | None = None,
             data_position: Any = None, config: Any = None) -> CheckpointInfo:
        """Save and commit a checkpoint of ``step`` now; return its info.

        ``scheduler`` and ``scaler`` are anything with ``state_dict()`` (an LR
        scheduler, a ``torch.amp.GradScaler``). ``data_position`` is where the
        data stream is (epoch, batch, a sampler generator's state…), returned as
        ``CheckpointInfo.data_position``. ``extra`` is any other JSON-like value
        (tensors allowed); ``metrics`` maps names to numbers (for ``keep_best``).
        Waits for an async save in flight first.
        """
        self._join()
        payload = self._capture(step, model, optimizer, scheduler, scaler, extra, metrics,
                                data_position, config, snapshot=False)
        return self._write(payload)

    def save_async(self, step: int, *, model: torch.nn.Module | None = None,
                   optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
                   scaler: Any = None, extra: Any = None,
                   metrics: Mapping[str, Any] | None = None, data_position: Any = None,
                   config: Any = None) -> None:
        """Snapshot the state to host memory and write it in a background thread.

        Returns once the snapshot is taken: training may change the model and
        optimizer immediately. At most one save is in flight: a second call
        first waits for the first. A failure of the background write is raised
        by the next call on this Checkpointer (``CheckpointWriteError``).
        Snapshot buffers are kept between async saves, so later snapshots are
        one memory copy (no allocation); they hold one host copy of the state.
        """
        self._join()
        started = time.perf_counter()
        payload = self._capture(step, model, optimizer, scheduler, scaler, extra, metrics,
                                data_position, config, snapshot=True)
        payload.blocking_seconds = time.perf_counter() - started
        self._thread = threading.Thread(target=self._write_in_background, args=(payload,),
                                        name=f"gradguard-ckpt-save-{payload.step}")
        self._thread.start()

    def maybe_save(self, step: int, every: int, *, blocking: bool = False,
                   **state: Any) -> bool:
        """Save (asynchronously unless ``blocking``) when ``step`` is a multiple of ``every``."""
        if every < 1 or step % every:
            return False
        if blocking:
            self.save(step, **state)
        else:
            self.save_async(step, **state)
        return True

    def wait(self) -> CheckpointInfo | None:
        """Wait for the save in flight; return the info of the last async save.

        Raises ``CheckpointWriteError`` if the background write failed.
        """
        self._join()
        return self._last_info

    close = wait

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.wait()
        elif self._thread is not None:
            self._thread.join()

    @property
    def in_flight(self) -> bool:
        """Whether an async save is being written."""
        return self._thread is not None and self._thread.is_alive()

    def _join(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        if self._error is not None:
            step, err = self._error
            self._error = None
            raise CheckpointWriteError(
                f"the background save of step {step} under {self.root} failed: "
                f"{type(err).__name__}: {err}") from err

    def _write_in_background(self, payload: _Payload) -> None:
        try:
            self._last_info = self._write(payload)
        except BaseException as err:
            self._error = (payload.step, err)

    # ---------------------------------------------------------------- capture
    def _capture(self, step: int, model: torch.nn.Module | None,
                 optimizer: torch.optim.Optimizer | None, scheduler: Any, scaler: Any,
                 extra: Any, metrics: Mapping[str, Any] | None, data_position: Any,
                 config: Any, *, snapshot: bool) -> _Payload:
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"invalid step={step!r}: must be an int >= 0")
        components: dict[str, dict[str, Any]] = {}
        files: dict[str, dict[str, Tensor]] = {}
        if model is not None:
            state = model.state_dict()
            encoder = TreeEncoder()
            components["model"] = {
                "file": MODEL_FILE, "class": qualified_name(model),
                "tree": encoder.encode(dict(state)),
                "metadata": TreeEncoder().encode(dict(getattr(state, "_metadata", None) or {})),
            }
            files[MODEL_FILE] = encoder.tensors
        if optimizer is not None:
            encoder = TreeEncoder()
            cfg = optimizer_config(optimizer)
            components["optimizer"] = {
                "file": OPTIMIZER_FILE, "class": qualified_name(optimizer),
                "tree": encoder.encode(optimizer.state_dict()),
                **optimizer_structure(optimizer),
                "config": cfg, "config_hash": config_hash(cfg),
            }
            files[OPTIMIZER_FILE] = encoder.tensors
        run_values = {
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": capture_rng(),
            "data_position": data_position,
            "extra": extra,
            "config": config if config is not None else self.config,
        }
        run_tensors: dict[str, Tensor] = {}
        for name in RUN_COMPONENTS:
            value = run_values[name]
            if value is None and name not in ("rng",):
                continue
            encoder = TreeEncoder(prefix=name)
            components[name] = {"file": RUN_FILE, "tree": encoder.encode(value)}
            if name in ("scheduler", "scaler"):
                components[name]["class"] = qualified_name(
                    scheduler if name == "scheduler" else scaler)
            run_tensors.update(encoder.tensors)
        files[RUN_FILE] = run_tensors
        for comp in components.values():
            if not files.get(comp["file"]):
                comp["file"] = None
        files = {f: t for f, t in files.items() if t}
        files = {f: self._host_copies(f, t, snapshot) for f, t in files.items()}
        if snapshot:  # drop buffers of tensors this save no longer has
            live = {(f, n) for f, t in files.items() for n in t}
            self._buffers = {k: v for k, v in self._buffers.items() if k in live}
        return _Payload(step=int(step), components=components, files=files,
                        metrics=_metrics(metrics), asynchronous=snapshot)

    def _host_copies(self, fname: str, tensors: dict[str, Tensor],
                     snapshot: bool) -> dict[str, Tensor]:
        if fname == RUN_FILE:  # small, and returned in CheckpointInfo: never shared
            return {name: t.detach().to("cpu", copy=True).contiguous()
                    for name, t in tensors.items()}
        if not snapshot:
            return {name: host_contiguous(t) for name, t in tensors.items()}
        out = {}
        on_cuda = False
        host: list[tuple[np.ndarray, np.ndarray]] = []
        for name, tensor in tensors.items():
            tensor = tensor.detach()
            buffer = self._buffers.get((fname, name))
            if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
                pin = tensor.device.type == "cuda"
                buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=pin)
                self._buffers[(fname, name)] = buffer
            if tensor.device.type == "cpu" and tensor.is_contiguous() and tensor.numel():
                host.append((_bytes_of(buffer), _bytes_of(tensor)))
            else:
                on_cuda |= tensor.device.type == "cuda"
                buffer.copy_(tensor, non_blocking=tensor.device.type == "cuda")
            out[name] = buffer
        _parallel_memcpy(host)
        if on_cuda:
            torch.cuda.synchronize()
        return out

    # ------------------------------------------------------------------ write
    def _write(self, payload: _Payload) -> CheckpointInfo:
        started = time.perf_counter()
        name = step_name(payload.step)
        staging = self.protocol.begin(name)
        try:
            records = self._write_files(staging, payload.files)
            manifest = self._manifest(payload, records)
            location = self.protocol.commit(staging, name, dump_manifest(manifest))
        except BaseException as err:
            self.protocol.abort(staging)
            self.audit.record("save_failed", step=payload.step, error=f"{type(err).__name__}: "
                              f"{err}", asynchronous=payload.asynchronous)
            raise
        seconds = time.perf_counter() - started
        size = sum(r.bytes for r in records.values())
        self.audit.record("save", step=payload.step, path=location, bytes=size,
                          seconds=round(seconds, 6), asynchronous=payload.asynchronous,
                          blocking_seconds=round(payload.blocking_seconds, 6) or None,
                          signed=self._key is not None, protocol=self.protocol.kind)
        self._metric_cache[name] = payload.metrics
        info = LoadedCheckpoint(location=location, manifest=manifest,
                                tensors={RUN_FILE: payload.files.get(RUN_FILE, {})}).info()
        self._retain()
        return info

    def _write_files(self, staging: str,
                     files: Mapping[str, Mapping[str, Tensor]]) -> dict[str, FileRecord]:
        """Write (and fsync) every file; large files concurrently, so that one file's
        fsync overlaps the next one's write."""
        def write(fname: str) -> FileRecord:
            return write_safetensors(functools.partial(self.protocol.open_file, staging, fname),
                                     files[fname], metadata={"format": FORMAT_NAME})

        large = [f for f, t in files.items()
                 if sum(x.numel() * x.element_size() for x in t.values()) >= _PARALLEL_BYTES]
        records: dict[str, FileRecord] = {}
        if len(large) > 1:
            with ThreadPoolExecutor(len(large), thread_name_prefix="gradguard-ckpt-write") as pool:
                records.update(zip(large, pool.map(write, large), strict=True))
        for fname in files:
            if fname not in records:
                records[fname] = write(fname)
        return {fname: records[fname] for fname in files}

    def _manifest(self, payload: _Payload, records: Mapping[str, FileRecord]) -> dict[str, Any]:
        manifest: dict[str, Any] = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "step": payload.step,
            "created": datetime.now(timezone.utc).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "versions": {
                "gradguard": gradguard.__version__,
                "torch": torch.__version__,
                "python": sys.version.split()[0],
                "numpy": np.__version__,
                "safetensors": safetensors.__version__,
            },
            "components": payload.components,
            "metrics": TreeEncoder().encode(payload.metrics),
            "files": {fname: record.to_json() for fname, record in records.items()},
        }
        manifest["checksum"] = manifest_digest(manifest)
        if self._key is not None:
            signing.sign(manifest, self._key)
        return manifest

    # ============================================================== retention
    def _retain(self) -> None:
        if self.keep_last is None and self.keep_every is None and self.keep_best is None:
            return
        names = sorted(self.protocol.committed(), key=lambda n: step_of(n) or 0)
        if not names:
            return
        keep = {names[-1]}
        if self.keep_last is not None:
            keep.update(names[-self.keep_last:])
        if self.keep_every is not None:
            keep.update(n for n in names if (step_of(n) or 0) % self.keep_every == 0)
        if self.keep_best is not None:
            keep.update(self._best(names, self.keep_best))
        for name in names:
            if name in keep:
                continue
            try:
                self.protocol.delete(name)
            except OSError as err:
                warnings.warn(CheckpointWarning(f"retention could not delete "
                                                f"{self.protocol.location(name)}: {err}"),
                              stacklevel=3)
                continue
            self._metric_cache.pop(name, None)
            self.audit.record("delete", step=step_of(name), path=self.protocol.location(name),
                              reason="retention", keep_last=self.keep_last,
                              keep_every=self.keep_every,
                              keep_best=None if self.keep_best is None else
                              [self.keep_best.metric, self.keep_best.mode, self.keep_best.count])

    def _best(self, names: list[str], rule: KeepBest) -> list[str]:
        scored = []
        for name in names:
            metrics = self._metric_cache.get(name)
            if metrics is None:
                try:
                    manifest = read_manifest(self.protocol, self.protocol.location(name))
                    metrics = decode_tree(manifest.get("metrics", {}), {}) or {}
                except (CheckpointError, OSError):
                    metrics = {}
                self._metric_cache[name] = metrics
            value = metrics.get(rule.metric)
            if isinstance(value, (int, float)) and not math.isnan(value):
                scored.append((value if rule.mode == "min" else -value, -(step_of(name) or 0),
                               name))
        return [name for *_, name in sorted(scored)[:rule.count]]

    # =============================================================== reading
    def steps(self) -> list[int]:
        """Steps of the committed checkpoints, oldest first (not verified)."""
        return sorted(s for s in map(step_of, self.protocol.committed()) if s is not None)

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint that verifies, or None.

        A newer checkpoint that fails verification (checksum, signature, format)
        is skipped with a ``CheckpointWarning`` and a ``refused`` audit record.
        """
        self._join()
        for location in self._newest_first():
            try:
                return load_verified(self.protocol, location, self._key,
                                     keep=frozenset()).info()
            except (CheckpointError, OSError) as err:
                self._refuse(location, err, falling_back=True)
        return None

    def _newest_first(self, below: int | None = None) -> list[str]:
        steps = [s for s in self.steps() if below is None or s < below]
        return [self.protocol.location(step_name(s)) for s in reversed(steps)]

    def _refuse(self, location: str, err: BaseException, *, falling_back: bool) -> None:
        problems = getattr(err, "problems", [str(err)])
        self.audit.record("refused", path=location, error=type(err).__name__,
                          problems=problems, fallback=falling_back)
        if falling_back:
            first = str(err).splitlines()[0]
            warnings.warn(CheckpointWarning(f"refusing checkpoint {location}: {first} "
                                            f"({len(problems)} problem(s)); falling back to "
                                            "an older checkpoint"), stacklevel=4)

    def _newest_good_below(self, step: int | None) -> CheckpointInfo | None:
        for location in self._newest_first(below=step):
            try:
                return load_verified(self.protocol, location, self._key,
                                     keep=frozenset()).info()
            except (CheckpointError, OSError):
                continue
        return None

    def _locate(self, path: str | os.PathLike[str]) -> tuple[CommitProtocol, str]:
        text = os.fspath(path)
        if step_of(text) is not None:  # a bare name: "step-000000000100"
            return self.protocol, self.protocol.location(text)
        protocol, location = split_location(text)
        if protocol.kind == self.protocol.kind and protocol.root == self.protocol.root:
            return self.protocol, location
        return protocol, location

    # =============================================================== restore
    def restore(self, *, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None
                = None, scheduler: Any = None, scaler: Any = None,
                path: str | os.PathLike[str] | None = None, allow_config_change: bool = False,
                rng: bool = True) -> CheckpointInfo:
        """Load a checkpoint into the given objects and restore the RNG states.

        ``path=None`` means the newest checkpoint that verifies (see :meth:`latest`);
        a checkpoint given by ``path`` that fails verification raises
        ``CheckpointCorruptError`` naming the newest older good one (``.fallback``).
        Before anything is loaded, the checkpoint is checked against the objects:
        a structure mismatch raises ``CheckpointMismatchError`` listing every
        difference; an optimizer configuration that differs raises
        ``OptimizerConfigMismatchError`` unless ``allow_config_change=True``, in
        which case the state is loaded, the changed hyperparameters keep their
        new values and the change is written to the audit log. ``rng=False``
        leaves the global generators alone.
        """
        self._join()
        keep = frozenset(f for f, obj in ((MODEL_FILE, model), (OPTIMIZER_FILE, optimizer))
                         if obj is not None)
        loaded = None
        if path is None:
            for location in self._newest_first():
                try:
                    loaded = load_verified(self.protocol, location, self._key, keep=keep)
                    break
                except (CheckpointError, OSError) as err:
                    self._refuse(location, err, falling_back=True)
            if loaded is None:
                raise CheckpointNotFoundError(f"no committed checkpoint that verifies under "
                                              f"{self.root}")
        else:
            protocol, location = self._locate(path)
            try:
                loaded = load_verified(protocol, location, self._key, keep=keep)
            except CheckpointCorruptError as err:
                self._refuse(location, err, falling_back=False)
                name = location.rstrip("/").rsplit("/", 1)[-1]
                fallback = (self._newest_good_below(step_of(name))
                            if protocol is self.protocol else None)
                hint = (f"\nThe newest older checkpoint that verifies is {fallback.path} "
                        f"(step {fallback.step}): restore(path=...) it, or restore() to fall "
                        "back automatically." if fallback is not None else "")
                error = type(err)(str(err) + hint, path=location, problems=err.problems)
                error.fallback = fallback
                raise error from None
        return self._apply(loaded, model, optimizer, scheduler, scaler, allow_config_change,
                           rng)

    def _apply(self, loaded: LoadedCheckpoint, model: torch.nn.Module | None,
               optimizer: torch.optim.Optimizer | None, scheduler: Any, scaler: Any,
               allow_config_change: bool, rng: bool) -> CheckpointInfo:
        m = loaded.manifest
        comps = m["components"]
        where = f"checkpoint {loaded.location} (step {m['step']})"
        differences: list[str] = []
        if model is not None:
            if "model" not in comps:
                differences.append("the checkpoint holds no model state")
            else:
                differences += model_differences(_model_index(m), model)
        if optimizer is not None:
            if "optimizer" not in comps:
                differences.append("the checkpoint holds no optimizer state")
            else:
                differences += optimizer_differences(comps["optimizer"], optimizer)
        for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
            if obj is None:
                continue
            if name not in comps:
                differences.append(f"the checkpoint holds no {name} state")
            elif comps[name].get("class") != qualified_name(obj):
                differences.append(f"{name}: {comps[name].get('class')} in the checkpoint, "
                                   f"{qualified_name(obj)} given")
        if (scaler is not None and "scaler" in comps and not comps["scaler"]["tree"]
                and getattr(scaler, "is_enabled", lambda: False)()):
            differences.append("scaler: the checkpoint's GradScaler state is empty (saved "
                               "from a disabled scaler); the given scaler is enabled")
        if differences:
            self.audit.record("refused", path=loaded.location, step=m["step"],
                              error="CheckpointMismatchError", problems=differences)
            raise CheckpointMismatchError(f"{where} does not fit the objects given to "
                                          "restore():", differences)

        config_changes: list[str] = []
        live_config: dict[str, Any] = {}
        saved_config: dict[str, Any] = {}
        if optimizer is not None:
            live_config = optimizer_config(optimizer)
            saved_config = comps["optimizer"]["config"]
            if config_hash(live_config) != comps["optimizer"]["config_hash"]:
                config_changes = config_differences(saved_config, live_config) or [
                    "the configuration hash differs"]
                if not allow_config_change:
                    self.audit.record("refused", path=loaded.location, step=m["step"],
                                      error="OptimizerConfigMismatchError",
                                      problems=config_changes)
                    raise OptimizerConfigMismatchError(
                        f"the optimizer's configuration differs from {where}; pass "
                        "allow_config_change=True to restore the state and keep the new "
                        "configuration:", config_changes)

        # Decode everything before touching any object: a failure here changes nothing.
        model_state = _model_state(loaded) if model is not None else None
        optimizer_state = loaded.component("optimizer") if optimizer is not None else None
        scheduler_state = loaded.component("scheduler") if scheduler is not None else None
        scaler_state = loaded.component("scaler") if scaler is not None else None
        rng_state = loaded.component("rng") if rng else None

        if model is not None:
            model.load_state_dict(model_state)  # type: ignore[arg-type]
        if optimizer is not None:
            live_groups = [dict(g) for g in optimizer.param_groups]
            optimizer.load_state_dict(optimizer_state)  # type: ignore[arg-type]
            if config_changes:
                for group, before, keys in zip(optimizer.param_groups, live_groups,
                                               changed_keys(saved_config, live_config),
                                               strict=True):
                    for key in keys:
                        group[key] = before[key]
                self.audit.record("config_change", path=loaded.location, step=m["step"],
                                  changes=config_changes, kept="the new configuration")
        if scheduler is not None:
            scheduler.load_state_dict(scheduler_state)
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
        if rng_state:
            for problem in restore_rng(rng_state):
                warnings.warn(CheckpointWarning(problem), stacklevel=3)
        info = loaded.info()
        self.audit.record("restore", step=info.step, path=info.path,
                          components=[n for n, o in (("model", model), ("optimizer", optimizer),
                                                     ("scheduler", scheduler),
                                                     ("scaler", scaler)) if o is not None]
                          + (["rng"] if rng_state else []),
                          config_changes=config_changes or None)
        return info


def _bytes_of(tensor: Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in (metrics or {}).items():
        if isinstance(value, Tensor):
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise CheckpointFormatError(f"metric {name!r} is {value!r}; metrics are numbers")
        out[str(name)] = value.item() if isinstance(value, np.number) else value
    return out


def _model_index(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """key -> {"shape", "dtype"} (None for non-tensor entries) of the saved model."""
    comp = manifest["components"]["model"]
    tree = comp["tree"]
    items = tree["$dict"] if set(tree) == {"$dict"} else tree.items()
    index = manifest["files"].get(comp.get("file") or "", {}).get("tensors", {})
    out: dict[str, dict[str, Any] | None] = {}
    for key, node in items:
        if isinstance(node, dict) and set(node) == {"$tensor"} and node["$tensor"] in index:
            entry = index[node["$tensor"]]
            out[key] = {"shape": entry["shape"], "dtype": DTYPES[entry["dtype"]]}
        else:
            out[key] = None
    return out


def _model_state(loaded: LoadedCheckpoint) -> OrderedDict[str, Any]:
    state = OrderedDict(loaded.component("model"))
    metadata = decode_tree(loaded.manifest["components"]["model"].get("metadata", {}), {})
    if metadata:
        state._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    return state


__all__ = ["CheckpointInfo", "Checkpointer", "KeepBest", "KeepBestSpec"]
