"""Readers for the ``ctr`` workload's real-data sources: Criteo TSV and libsvm files.

Both return numpy arrays and raise :class:`CTRFileError` (a ``ValueError``) for a
malformed file, naming the file, the line number (1-based) and what was expected;
a missing file is a ``FileNotFoundError``. Nothing here is written, only read.
"""

from __future__ import annotations

import gzip
import io
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

N_DENSE = 13
"""Criteo's integer columns I1..I13."""
N_CATEGORICAL = 26
"""Criteo's categorical columns C1..C26."""
N_COLUMNS = 1 + N_DENSE + N_CATEGORICAL

_HEX = re.compile(r"[0-9a-fA-F]+")


class CTRFileError(ValueError):
    """A data file that does not follow its format (file, line number and what was expected)."""


def stable_hash(field: int, value: str) -> int:
    """A 32-bit hash of a categorical value, the same in every process and on every platform.

    ``zlib.crc32`` of ``"<field>:<value>"`` (UTF-8), not Python's ``hash`` (which is
    randomised per process for strings).
    """
    return zlib.crc32(f"{field}:{value}".encode())


def hash_bucket(field: int, value: str, buckets: int) -> int:
    """The row of ``value`` in field ``field``'s table of ``buckets`` rows.

    Row 0 is the missing value (an empty column); a value ``v`` goes to row
    ``1 + stable_hash(field, v) % (buckets - 1)``.
    """
    if value == "":
        return 0
    return 1 + stable_hash(field, value) % (buckets - 1)


def _check_file(path: Path, source: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"ctr: source={source!r}: file not found: {str(path)!r}")
    if not path.is_file():
        raise FileNotFoundError(f"ctr: source={source!r}: not a regular file: {str(path)!r}")


def _open_text(path: Path) -> IO[str]:
    """``path`` as text; gzip-compressed files (by their magic bytes) are decompressed."""
    with path.open("rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def _lines(path: Path, max_rows: int | None) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) for the non-empty lines, at most ``max_rows``."""
    rows = 0
    with _open_text(path) as f:
        try:
            for number, raw in enumerate(f, start=1):
                line = raw.rstrip("\r\n")
                if not line.strip():
                    continue
                if max_rows is not None and rows >= max_rows:
                    return
                rows += 1
                yield number, line
        except UnicodeDecodeError as exc:
            raise CTRFileError(f"{str(path)!r}: not a UTF-8 text file ({exc.reason})") from exc
        except (OSError, EOFError) as exc:  # a truncated or corrupt gzip stream
            raise CTRFileError(f"{str(path)!r}: cannot be read (a truncated or corrupt "
                               f"compressed file?): {exc}") from exc


@dataclass
class CriteoData:
    """A Criteo file: ``labels`` (n,) float32 in {0, 1}; ``dense`` (n, 13) float32 raw
    integer values (missing: 0); ``categorical`` (n, 26) int32 hashed rows in
    ``[0, hash_buckets)`` (0: missing)."""

    labels: np.ndarray
    dense: np.ndarray
    categorical: np.ndarray


def read_criteo(path: str | Path, *, hash_buckets: int, max_rows: int | None = None,
                ) -> CriteoData:
    """Read a Criteo-format TSV file (plain or gzip).

    Each line: ``label \\t I1 .. I13 \\t C1 .. C26`` (40 tab-separated columns): the
    label ``0`` or ``1``; 13 integers, possibly empty (missing: 0) and possibly
    negative (Criteo's I2); 26 hexadecimal strings, possibly empty, each hashed with
    :func:`hash_bucket` into ``hash_buckets`` rows of its field. Blank lines are
    skipped; at most ``max_rows`` rows are read (the first ones).
    """
    path = Path(path)
    _check_file(path, "criteo")
    name = str(path)
    labels: list[float] = []
    dense: list[list[float]] = []
    categorical: list[list[int]] = []
    caches: list[dict[str, int]] = [{} for _ in range(N_CATEGORICAL)]
    for number, line in _lines(path, max_rows):
        columns = line.split("\t")
        if len(columns) != N_COLUMNS:
            hint = (" (a file without labels, such as Criteo's test.txt, cannot be used)"
                    if len(columns) == N_COLUMNS - 1 else "")
            raise CTRFileError(
                f"{name!r}, line {number}: expected {N_COLUMNS} tab-separated columns "
                f"(label, {N_DENSE} integers, {N_CATEGORICAL} categorical), got "
                f"{len(columns)}{hint}")
        label = columns[0].strip()
        if label not in ("0", "1"):
            raise CTRFileError(f"{name!r}, line {number}, column 1 (label): expected 0 or 1, "
                               f"got {label!r}")
        labels.append(float(label))
        row: list[float] = []
        for j in range(N_DENSE):
            text = columns[1 + j].strip()
            if text == "":
                row.append(0.0)
                continue
            try:
                row.append(float(int(text)))
            except ValueError:
                raise CTRFileError(
                    f"{name!r}, line {number}, column {2 + j} (I{1 + j}): expected an integer "
                    f"or an empty field, got {text!r}") from None
        dense.append(row)
        ids: list[int] = []
        for k in range(N_CATEGORICAL):
            text = columns[1 + N_DENSE + k].strip()
            cache = caches[k]
            bucket = cache.get(text)
            if bucket is None:
                if text and not _HEX.fullmatch(text):
                    raise CTRFileError(
                        f"{name!r}, line {number}, column {2 + N_DENSE + k} (C{1 + k}): "
                        f"expected a hexadecimal string or an empty field, got {text!r}")
                bucket = cache[text] = hash_bucket(k, text, hash_buckets)
            ids.append(bucket)
        categorical.append(ids)
    if not labels:
        raise CTRFileError(f"{name!r}: no data lines (expected Criteo TSV lines: label, "
                           f"{N_DENSE} integers, {N_CATEGORICAL} categorical)")
    return CriteoData(labels=np.asarray(labels, dtype=np.float32),
                      dense=np.asarray(dense, dtype=np.float32),
                      categorical=np.asarray(categorical, dtype=np.int32))


@dataclass
class LibsvmData:
    """A libsvm file as padded rows: ``indices`` (n, k) int64 feature numbers (padding:
    -1), ``values`` (n, k) float32 (padding: 0), ``labels`` (n,) float32 in {0, 1};
    ``n_features`` columns; ``k`` is the largest number of non-zeros in a row (at
    least 1)."""

    indices: np.ndarray
    values: np.ndarray
    labels: np.ndarray
    n_features: int


def read_libsvm(path: str | Path, *, max_rows: int | None = None) -> LibsvmData:
    """Read a libsvm/svmlight file (``label index:value ...``) with scikit-learn.

    Labels must be in {0, 1} or in {-1, +1} (-1 becomes 0). Feature indices are
    zero- or one-based (scikit-learn's ``zero_based="auto"``). gzip/bz2 files are
    decompressed by their extension (scikit-learn's rule). A file scikit-learn
    refuses is scanned line by line to name the first malformed line.
    """
    from sklearn.datasets import load_svmlight_file

    path = Path(path)
    _check_file(path, "libsvm")
    name = str(path)
    try:
        matrix, y = load_svmlight_file(str(path), dtype=np.float32, zero_based="auto")
    except (ValueError, RuntimeError) as exc:
        _locate_libsvm_error(path)
        raise CTRFileError(f"{name!r}: not a valid libsvm file: {exc}") from exc
    if max_rows is not None:
        matrix, y = matrix[:max_rows], y[:max_rows]
    if matrix.shape[0] == 0:
        raise CTRFileError(f"{name!r}: no data lines (expected libsvm lines: "
                           "'label index:value ...')")
    found = set(np.unique(y).tolist())
    if found <= {0.0, 1.0}:
        labels = y.astype(np.float32)
    elif found <= {-1.0, 1.0}:
        labels = (y > 0).astype(np.float32)
    else:
        shown = ", ".join(f"{v:g}" for v in sorted(found)[:8])
        raise CTRFileError(f"{name!r}: expected binary labels in {{0, 1}} or {{-1, +1}}, "
                           f"found {shown}{' ...' if len(found) > 8 else ''}")
    matrix = matrix.tocsr()
    matrix.sort_indices()
    counts = np.diff(matrix.indptr)
    width = max(int(counts.max()), 1)
    n = matrix.shape[0]
    indices = np.full((n, width), -1, dtype=np.int64)
    values = np.zeros((n, width), dtype=np.float32)
    rows = np.repeat(np.arange(n), counts)
    columns = np.arange(matrix.nnz) - np.repeat(matrix.indptr[:-1], counts)
    indices[rows, columns] = matrix.indices
    values[rows, columns] = matrix.data
    return LibsvmData(indices=indices, values=values, labels=labels,
                      n_features=int(matrix.shape[1]))


def _locate_libsvm_error(path: Path) -> None:
    """Raise :class:`CTRFileError` for the first line that is not ``label index:value ...``."""
    name = str(path)
    for number, line in _lines(path, None):
        text = line.split("#", 1)[0].split()
        if not text:
            continue
        try:
            float(text[0])
        except ValueError:
            raise CTRFileError(f"{name!r}, line {number}: expected a numeric label first, "
                               f"got {text[0]!r}") from None
        previous = -1
        for token in text[1:]:
            if token.startswith("qid:"):
                continue
            index, sep, value = token.partition(":")
            try:
                if not sep:
                    raise ValueError
                position = int(index)
                float(value)
            except ValueError:
                raise CTRFileError(f"{name!r}, line {number}: expected 'index:value' with an "
                                   f"integer index and a numeric value, got {token!r}") from None
            if position < 0:
                raise CTRFileError(f"{name!r}, line {number}: expected a non-negative feature "
                                   f"index, got {token!r}")
            if position <= previous:
                raise CTRFileError(f"{name!r}, line {number}: expected feature indices in "
                                   f"increasing order, got {position} after {previous}")
            previous = position
