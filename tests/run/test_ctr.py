"""The ``ctr`` workload, specified.

Synthetic click logs come from a known logistic model (``GroundTruth``), so the
best achievable log-loss is known; real Criteo TSV and libsvm files are read with
clear errors; the model trains with gradguard's row-wise Adagrad + AdamW to
within 2% of the optimum.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from gradguard.optim import AdamW, Hybrid, RowWiseAdagrad, split_parameters
from gradguard.run.workload import Target, Workload
from gradguard.run.workloads import _ctr_io
from gradguard.run.workloads.ctr import (
    DEFAULT_VOCAB,
    DEFAULTS,
    N_DENSE,
    N_FIELDS,
    _ZipfTable,
    auc,
    ctr,
    ground_truth,
    logloss,
)

SMALL: dict[str, Any] = {"n_train": 3000, "n_eval": 2000, "vocab": 50}
"""Tiny data for structural checks (generated in milliseconds)."""

ACCEPTANCE: dict[str, Any] = {"n_train": 200_000, "n_eval": 20_000, "vocab": 200}
"""The small configuration that trains to within 2% of the optimum in seconds."""


def _table(w: Workload, name: str = "embeddings.weight") -> torch.nn.Parameter:
    return dict(w.model.named_parameters())[name]


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: fast and reproducible on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small() -> Workload:
    return ctr(seed=0, **SMALL)


@pytest.fixture(scope="module")
def medium() -> Workload:
    """Default vocabularies, 200k training rows: enough for the statistical checks."""
    return ctr(seed=1, n_train=200_000, n_eval=20_000)


# ------------------------------------------------------------------- determinism
def test_the_same_seed_gives_the_same_workload_and_another_seed_another() -> None:
    a, b, c = ctr(seed=3, **SMALL), ctr(seed=3, **SMALL), ctr(seed=4, **SMALL)
    assert a.train.fingerprint() == b.train.fingerprint()
    assert a.eval.fingerprint() == b.eval.fingerprint()
    assert a.info == b.info
    for (name, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items(),
                                 strict=True):
        assert torch.equal(p, q), name
    assert a.train.fingerprint() != c.train.fingerprint()
    assert a.eval.fingerprint() != c.eval.fingerprint()
    assert not torch.equal(_table(a), _table(c))


def test_building_a_workload_leaves_torch_global_rng_alone() -> None:
    state = torch.get_rng_state()
    ctr(seed=0, **SMALL)
    assert torch.equal(state, torch.get_rng_state())


def test_the_ground_truth_and_the_training_split_do_not_depend_on_n_eval() -> None:
    a = ctr(seed=0, n_train=3000, n_eval=2000, vocab=50)
    b = ctr(seed=0, n_train=3000, n_eval=500, vocab=50)
    assert a.train.fingerprint() == b.train.fingerprint()
    ta, tb = ground_truth(seed=0, vocab=50), ground_truth(seed=0, vocab=50, n_train=7)
    assert ta.bias == tb.bias
    assert all(np.array_equal(x, y) for x, y in zip(ta.effects, tb.effects, strict=True))


# ---------------------------------------------------------------- the generator
def _rank_frequencies(ids: torch.Tensor, field: int) -> np.ndarray:
    """Empirical frequencies of field ``field``'s ids, most frequent first."""
    counts = np.bincount(ids[:, field].numpy())
    return np.sort(counts)[::-1] / ids.shape[0]


@pytest.mark.parametrize("zipf", [1.1, 1.5])
def test_categorical_ids_follow_the_zipf_law(zipf: float) -> None:
    n = 200_000
    w = ctr(seed=2, n_train=n, n_eval=2, vocab=1000, zipf=zipf)
    ids = w.train.tensors[0]
    assert ids.dtype == torch.int32 and ids.shape == (n, N_FIELDS)
    assert int(ids.min()) >= 0 and int(ids.max()) < 1000
    law = np.arange(1, 1001, dtype=np.float64) ** -zipf
    law /= law.sum()
    for field in (0, 7, 25):
        freq = _rank_frequencies(ids, field)
        # the head: each of the 5 most frequent ids within 5 binomial standard errors
        se = np.sqrt(law[:5] * (1 - law[:5]) / n)
        assert np.all(np.abs(freq[:5] - law[:5]) < 5 * se), (field, freq[:5], law[:5])
        # rank-frequency slope on log-log axes (ranks 1..100) is -zipf
        ranks = np.arange(1, 101)
        slope = np.polyfit(np.log(ranks), np.log(freq[:100]), 1)[0]
        assert slope == pytest.approx(-zipf, abs=0.06), (field, slope)
    # the ids are a permutation of the ranks: the most frequent id is the truth's rank 1
    truth = ground_truth(seed=2, vocab=1000, zipf=zipf)
    assert np.bincount(ids[:, 0].numpy()).argmax() == truth.ids_by_rank[0][0]


def test_the_zipf_sampler_inverts_the_cdf_exactly() -> None:
    p = np.arange(1, 3001, dtype=np.float64) ** -1.1
    table = _ZipfTable(p / p.sum())
    rng = np.random.default_rng(0)
    edges = table.thresholds.astype(np.uint32)
    bits = np.concatenate([rng.integers(0, 1 << 32, 100_000, dtype=np.uint32), edges,
                           edges - np.uint32(1), np.array([0, 2**32 - 1], dtype=np.uint32)])
    expected = np.searchsorted(table.thresholds, bits.astype(np.uint64), side="right")
    assert np.array_equal(table.ranks(bits), expected)


def test_dense_fields_are_criteo_like_counts(medium: Workload) -> None:
    dense = medium.train.tensors[1]
    assert dense.dtype == torch.float32 and dense.shape[1] == N_DENSE
    assert bool((dense >= 0).all()) and bool((dense == dense.floor()).all())
    zeros = (dense == 0).double().mean(dim=0)
    assert float(zeros.max()) > 0.5 and float(zeros.min()) < 0.05  # sparse and busy fields
    median = dense.median(dim=0).values.clamp(min=1)
    assert float((dense.max(dim=0).values / median).max()) > 1000  # heavy tails


def test_labels_are_drawn_from_the_true_probabilities(medium: Workload) -> None:
    truth = ground_truth(seed=1)
    ids, dense, labels = medium.train.all()
    p = torch.sigmoid(truth.logits(ids, dense))
    y = labels.double()
    assert float(p.mean()) == pytest.approx(0.22, abs=0.01)  # a realistic CTR
    edges = torch.quantile(p[:100_000], torch.linspace(0, 1, 11, dtype=torch.float64))
    bins = torch.bucketize(p, edges[1:-1])
    for b in range(10):
        mask = bins == b
        expected, observed = float(p[mask].mean()), float(y[mask].mean())
        se = math.sqrt(expected * (1 - expected) / int(mask.sum()))
        assert abs(observed - expected) < 4.5 * se, (b, observed, expected)


def test_info_states_the_optimum_of_the_eval_split(medium: Workload) -> None:
    truth = ground_truth(seed=1)
    ids, dense, labels = medium.eval.all()
    z = truth.logits(ids, dense)
    assert medium.info["optimal_logloss"] == pytest.approx(logloss(z, labels), abs=1e-12)
    assert medium.info["optimal_auc"] == pytest.approx(auc(z, labels), abs=1e-12)
    rate = float(medium.train.tensors[2].double().mean())
    assert medium.info["base_rate"] == pytest.approx(rate)
    base = log_loss(labels.numpy(), np.full(len(labels), rate), labels=[0, 1])
    assert medium.info["base_logloss"] == pytest.approx(base, rel=1e-9)
    # a realistic problem: features explain a good part of the base log-loss
    assert 0.75 < medium.info["optimal_logloss"] / medium.info["base_logloss"] < 0.9
    assert 0.75 < medium.info["optimal_auc"] < 0.85
    assert medium.target == Target("logloss", 1.02 * medium.info["optimal_logloss"], "min")
    # the expected log-loss of the truth (its mean binary entropy) agrees within noise
    p = torch.sigmoid(z)
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    per_sample = torch.nn.functional.binary_cross_entropy_with_logits(
        z, labels.double(), reduction="none")
    se = float(per_sample.std()) / math.sqrt(len(labels))
    assert abs(float(entropy.mean()) - medium.info["optimal_logloss"]) < 4 * se


@pytest.mark.parametrize(("scale", "shift"), [(1.0, 0.3), (1.0, -0.3), (0.7, 0.0),
                                              (1.4, 0.0)])
def test_no_distortion_of_the_true_logit_beats_it(medium: Workload, scale: float,
                                                  shift: float) -> None:
    truth = ground_truth(seed=1)
    ids, dense, labels = medium.eval.all()
    z = truth.logits(ids, dense)
    assert logloss(scale * z + shift, labels) > medium.info["optimal_logloss"]


# -------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("seed", range(5))
def test_auc_equals_sklearn_with_ties(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = 50 + 400 * seed
    scores = torch.randint(0, 7, (n,), generator=gen).double()  # many ties
    labels = (torch.rand(n, generator=gen) < 0.3).float()
    assert auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    smooth = torch.randn(n, generator=gen) + labels
    assert auc(smooth, labels) == pytest.approx(roc_auc_score(labels, smooth), abs=1e-12)


def test_auc_edge_cases() -> None:
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert auc(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels) == 1.0
    assert auc(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels) == 0.0
    assert auc(torch.zeros(4), labels) == 0.5
    assert math.isnan(auc(torch.rand(4), torch.ones(4)))
    assert math.isnan(auc(torch.tensor([0.1, float("nan"), 0.3, 0.4]), labels))


def test_logloss_equals_sklearn() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(1000, generator=gen)
    labels = (torch.rand(1000, generator=gen) < 0.4).float()
    expected = log_loss(labels.numpy(), torch.sigmoid(logits.double()).numpy())
    assert logloss(logits, labels) == pytest.approx(expected, rel=1e-9)


def test_evaluate_reports_logloss_and_auc_of_the_whole_split(small: Workload) -> None:
    assert small.info["eval_whole_split"] is True
    assert small.primary_metric == "logloss" and small.mode == "min"
    ids, dense, labels = small.eval.all()
    with torch.no_grad():
        metrics = small.evaluate(small.model, small.eval.all())
        logits = small.model(ids, dense)
    assert set(metrics) == {"logloss", "auc"}
    assert metrics["logloss"] == pytest.approx(logloss(logits, labels))
    assert metrics["auc"] == pytest.approx(roc_auc_score(labels, logits), abs=1e-9)
    # the untrained model starts at the base rate
    assert metrics["logloss"] == pytest.approx(small.info["base_logloss"], abs=0.01)


# ---------------------------------------------------------------------------- model
@pytest.mark.parametrize("sparse", [True, False])
def test_embedding_tables_are_named_and_get_the_requested_gradients(sparse: bool) -> None:
    w = ctr(seed=0, **SMALL, sparse=sparse, embedding_dim=4, hidden=[16])
    params = dict(w.model.named_parameters())
    assert w.embeddings == ["embeddings.weight", "wide.weight"]
    tables, _ = split_parameters(w.model)
    assert [id(p) for p in tables] == [id(params[name]) for name in w.embeddings]
    assert params["embeddings.weight"].shape == (N_FIELDS * 50, 4)
    assert params["wide.weight"].shape == (N_FIELDS * 50, 1)
    w.loss(w.model, w.train.batch(torch.arange(64))).backward()
    for name in w.embeddings:
        grad = params[name].grad
        assert grad is not None and grad.is_sparse is sparse


def test_slices_split_the_eval_rows_by_field_0_frequency(medium: Workload) -> None:
    head, tail = medium.slices["head"], medium.slices["tail"]
    assert head.dtype == torch.bool and head.shape == (len(medium.eval),)
    assert bool((head ^ tail).all())
    truth = ground_truth(seed=1)
    top = torch.from_numpy(truth.head_ids(0))
    assert len(top) == math.ceil(0.01 * DEFAULT_VOCAB[0])
    assert torch.equal(head, torch.isin(medium.eval.tensors[0][:, 0], top))
    assert 0.2 < float(head.double().mean()) < 0.8


def test_info_is_json_serialisable(small: Workload) -> None:
    json.dumps(small.info)


# -------------------------------------------------------------------------- readers
CRITEO_ROWS = [
    # label, I1..I13, C1..C26 (hex)
    ["1", "5", "-1", "", "0", "12", "", "3", "7", "", "1", "2", "", "9"]
    + ["68fd1e64", "80e26c9b", "", "a8cd5504"] + ["" if k % 5 == 0 else f"{k:08x}"
                                                  for k in range(22)],
    ["0", *[""] * 13, *[""] * 26],
    ["0", *[str(i) for i in range(100, 113)], *[f"{k + 1:x}" for k in range(26)]],
]


def _write_criteo(path: Path, rows: list[list[str]], *, compress: bool = False) -> Path:
    text = "".join("\t".join(row) + "\n" for row in rows)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_hashing_is_stable_across_processes_and_row_0_is_missing() -> None:
    # crc32 of "2:68fd1e64": the same value in every process (unlike Python's hash)
    assert _ctr_io.stable_hash(2, "68fd1e64") == 4034990069
    assert _ctr_io.hash_bucket(2, "68fd1e64", 1000) == 1 + 4034990069 % 999
    assert _ctr_io.hash_bucket(5, "", 1000) == 0
    assert _ctr_io.hash_bucket(0, "68fd1e64", 1000) != _ctr_io.hash_bucket(1, "68fd1e64", 1000)


@pytest.mark.parametrize("compress", [False, True])
def test_criteo_reader_parses_values_and_empty_fields(tmp_path: Path, compress: bool) -> None:
    path = _write_criteo(tmp_path / ("day.tsv.gz" if compress else "day.tsv"), CRITEO_ROWS,
                         compress=compress)
    data = _ctr_io.read_criteo(path, hash_buckets=1000)
    assert data.labels.tolist() == [1.0, 0.0, 0.0]
    assert data.dense[0].tolist() == [5, -1, 0, 0, 12, 0, 3, 7, 0, 1, 2, 0, 9]
    assert data.dense[1].tolist() == [0] * 13
    assert data.dense[2].tolist() == list(range(100, 113))
    for r, row in enumerate(CRITEO_ROWS):
        expected = [_ctr_io.hash_bucket(k, v, 1000) for k, v in enumerate(row[14:])]
        assert data.categorical[r].tolist() == expected
    assert data.categorical[1].tolist() == [0] * 26
    assert _ctr_io.read_criteo(path, hash_buckets=1000, max_rows=2).labels.shape == (2,)


def test_criteo_workload_splits_the_rows_by_seed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = [[str(int(rng.random() < 0.3)), str(i), *[""] * 12,
             *[f"{rng.integers(0, 40):x}" for _ in range(26)]] for i in range(400)]
    path = _write_criteo(tmp_path / "train.txt", rows)
    w = ctr(seed=5, source="criteo", path=str(path), eval_fraction=0.25, hash_buckets=64)
    assert (len(w.train), len(w.eval)) == (300, 100)
    seen = torch.cat([w.train.tensors[1][:, 0], w.eval.tensors[1][:, 0]]).sort().values
    assert torch.equal(seen, torch.arange(400, dtype=torch.float32))  # a partition
    again = ctr(seed=5, source="criteo", path=str(path), eval_fraction=0.25, hash_buckets=64)
    assert again.eval.fingerprint() == w.eval.fingerprint()
    other = ctr(seed=6, source="criteo", path=str(path), eval_fraction=0.25, hash_buckets=64)
    assert other.eval.fingerprint() != w.eval.fingerprint()
    assert w.target is None and "optimal_logloss" not in w.info
    assert _table(w).shape == (26 * 64, 8)
    assert bool((w.slices["head"] ^ w.slices["tail"]).all())
    assert set(w.evaluate(w.model, w.eval.all())) == {"logloss", "auc"}


@pytest.mark.parametrize(("positive", "negative"), [("1", "0"), ("+1", "-1")])
def test_libsvm_reader_accepts_both_label_conventions(tmp_path: Path, positive: str,
                                                      negative: str) -> None:
    path = tmp_path / "data.svm"
    path.write_text(f"{positive} 1:0.5 3:2\n{negative} 2:1.5\n{negative} 1:1 2:1 4:-1\n")
    data = _ctr_io.read_libsvm(path)
    assert data.labels.tolist() == [1.0, 0.0, 0.0]
    assert data.n_features == 4  # one-based indices 1..4 become 0..3
    assert data.indices.tolist() == [[0, 2, -1], [1, -1, -1], [0, 1, 3]]
    assert data.values.tolist() == [[0.5, 2.0, 0.0], [1.5, 0.0, 0.0], [1.0, 1.0, -1.0]]


def test_libsvm_workload_trains_on_value_weighted_bags(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(300):
        features = np.sort(rng.choice(np.arange(1, 41), size=rng.integers(1, 6), replace=False))
        lines.append(f"{rng.choice(['-1', '+1'])} "
                     + " ".join(f"{j}:{rng.random():.3f}" for j in features))
    path = tmp_path / "train.svm"
    path.write_text("\n".join(lines) + "\n")
    w = ctr(seed=0, source="libsvm", path=str(path), eval_fraction=0.2, hash_buckets=16)
    indices = w.train.tensors[0]
    assert (len(w.train), len(w.eval)) == (240, 60)
    assert int(indices.max()) == 16 and int(indices.min()) == 0  # 16 rows + the padding row
    assert _table(w).shape == (17, 8) and w.target is None
    loss = w.loss(w.model, w.train.all())
    loss.backward()
    grad = _table(w).grad
    assert math.isfinite(float(loss.detach())) and grad is not None and grad.is_sparse
    assert float(grad.to_dense()[16].abs().sum()) == 0.0  # the padding row stays out
    full = ctr(seed=0, source="libsvm", path=str(path))
    assert _table(full).shape == (41, 8)  # 40 features, no hashing


# -------------------------------------------------------------------- file errors
def _line(bad: list[str]) -> list[list[str]]:
    return [CRITEO_ROWS[2], bad]


@pytest.mark.parametrize(("row", "message"), [
    (["1", "2", "3"], r"line 2: expected 40 tab-separated columns .* got 3"),
    (CRITEO_ROWS[2][:-1], r"line 2: expected 40 .* got 39 \(a file without labels"),
    (["2", *CRITEO_ROWS[2][1:]], r"line 2, column 1 \(label\): expected 0 or 1, got '2'"),
    (["0", "1.5", *CRITEO_ROWS[2][2:]], r"line 2, column 2 \(I1\): expected an integer"),
    ([*CRITEO_ROWS[2][:20], "zz!", *CRITEO_ROWS[2][21:]],
     r"line 2, column 21 \(C7\): expected a hexadecimal string"),
])
def test_malformed_criteo_lines_are_named(tmp_path: Path, row: list[str], message: str) -> None:
    path = _write_criteo(tmp_path / "bad.tsv", _line(row))
    with pytest.raises(ValueError, match=message) as error:
        ctr(source="criteo", path=str(path))
    assert "bad.tsv" in str(error.value)


@pytest.mark.parametrize(("text", "message"), [
    ("1 1:0.5\n0 3:abc\n", r"line 2: expected 'index:value' .* got '3:abc'"),
    ("1 1:0.5\nyes 1:1\n", r"line 2: expected a numeric label first, got 'yes'"),
    ("1 1:0.5\n0 4:1 2:1\n", r"line 2: expected feature indices in increasing order"),
    ("1 1:0.5\n2 1:1\n", r"expected binary labels in \{0, 1\} or \{-1, \+1\}, found 1, 2"),
])
def test_malformed_libsvm_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.svm"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as error:
        ctr(source="libsvm", path=str(path))
    assert "bad.svm" in str(error.value)


@pytest.mark.parametrize("source", ["criteo", "libsvm"])
def test_missing_and_empty_files_are_refused(tmp_path: Path, source: str) -> None:
    with pytest.raises(FileNotFoundError, match=r"file not found: .*absent\.txt"):
        ctr(source=source, path=str(tmp_path / "absent.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match=r"empty\.txt.*no data lines"):
        ctr(source=source, path=str(tmp_path / "empty.txt"))


def test_a_truncated_gzip_file_is_refused(tmp_path: Path) -> None:
    path = _write_criteo(tmp_path / "day.gz", CRITEO_ROWS * 50, compress=True)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"day\.gz.*truncated or corrupt"):
        ctr(source="criteo", path=str(path))


# -------------------------------------------------------------------------- options
@pytest.mark.parametrize(("options", "message"), [
    ({"n_train": 0}, r"'n_train' = 0 is invalid; allowed: an integer >= 1"),
    ({"n_train": 2.5}, r"'n_train' = 2.5 is invalid"),
    ({"n_eval": 1}, r"'n_eval' = 1 is invalid; allowed: an integer >= 2"),
    ({"vocab": 1}, r"'vocab' = 1 is invalid; allowed: an integer in \[2, 10000000\] or a list"),
    ({"vocab": 10**8}, r"'vocab' = 100000000 is invalid"),
    ({"vocab": [10] * 25}, r"'vocab' = \[10, .*\] is invalid"),
    ({"zipf": 0}, r"'zipf' = 0 is invalid; allowed: a number in \(0, 5\]"),
    ({"zipf": float("nan")}, r"'zipf' = nan is invalid"),
    ({"embedding_dim": 0}, r"'embedding_dim' = 0 is invalid"),
    ({"embedding_dim": True}, r"'embedding_dim' = True is invalid"),
    ({"hidden": [64, 0]}, r"'hidden' = \[64, 0\] is invalid; allowed: a list of positive"),
    ({"hidden": 64}, r"'hidden' = 64 is invalid"),
    ({"sparse": "yes"}, r"'sparse' = 'yes' is invalid; allowed: true or false"),
    ({"source": "avazu"}, r"'source' = 'avazu' is invalid; allowed: 'synthetic' \| 'criteo'"),
    ({"seed": -1}, r"'seed' = -1 is invalid"),
    ({"path": "day.tsv"}, r"'path' = 'day.tsv' does not apply to source='synthetic'"),
    ({"hash_buckets": 100}, r"'hash_buckets' = 100 does not apply to source='synthetic'"),
    ({"source": "criteo"}, r"source='criteo' needs option 'path'"),
    ({"source": "criteo", "path": "x", "n_train": 10},
     r"'n_train' = 10 does not apply to source='criteo'"),
    ({"source": "criteo", "path": "x", "eval_fraction": 1.0}, r"'eval_fraction' = 1.0 is"),
    ({"source": "criteo", "path": "x", "hash_buckets": 1}, r"'hash_buckets' = 1 is invalid"),
    ({"source": "libsvm", "path": "x", "max_rows": 0}, r"'max_rows' = 0 is invalid"),
])
def test_invalid_options_are_refused_with_name_value_and_allowed(options: dict[str, Any],
                                                                 message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ctr(**options)


def test_unknown_options_are_refused_listing_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) 'lr'; known options: source, "
                                         r"n_train, n_eval, vocab, zipf, embedding_dim"):
        ctr(seed=0, lr=0.1)


def test_every_default_is_accepted_by_every_source(tmp_path: Path) -> None:
    """A config that lists every default (as ``gradguard config example`` prints it) works."""
    listed: dict[str, Any] = {k: list(v) if isinstance(v, tuple) else v
                              for k, v in DEFAULTS.items() if v is not None}
    path = _write_criteo(tmp_path / "day.tsv", CRITEO_ROWS * 4)
    w = ctr(seed=0, **{**listed, "source": "criteo", "path": str(path), "hash_buckets": 8})
    assert len(w.train) + len(w.eval) == 12
    assert ctr(seed=0, **{**listed, "n_train": 100, "n_eval": 50}).info["n_train"] == 100


def test_the_registry_lists_the_options_with_their_defaults() -> None:
    from gradguard.run import workloads

    assert workloads.options("ctr") == DEFAULTS
    w = workloads.load("ctr", seed=0, options=SMALL)
    assert w.name == "ctr" and len(w.train) == SMALL["n_train"]


# ----------------------------------------------------------------------- acceptance
def test_hybrid_training_reaches_within_2_percent_of_the_optimum(one_thread: None) -> None:
    """The acceptance criterion: row-wise Adagrad on the tables + AdamW on the MLP, a
    small budget (2 epochs of 200k rows, batch 512), eval log-loss <= 1.02 x optimum."""
    start = time.perf_counter()
    w = ctr(seed=0, **ACCEPTANCE)
    tables, dense = split_parameters(w.model)
    optimizer = Hybrid({"embeddings": RowWiseAdagrad(tables, lr=0.05, weight_decay=1e-3),
                        "dense": AdamW(dense, lr=2e-3, weight_decay=0.0)})
    order = torch.Generator().manual_seed(0)
    for _ in range(2):
        for batch in torch.randperm(len(w.train), generator=order).split(512):
            optimizer.zero_grad()
            w.loss(w.model, w.train.batch(batch)).backward()
            optimizer.step()
    with torch.no_grad():
        metrics = w.evaluate(w.model, w.eval.all())
        ids, dense_x, labels = w.eval.all()
        model_ll = torch.nn.functional.binary_cross_entropy_with_logits(
            w.model(ids, dense_x).double(), labels.double(), reduction="none")
    truth = ground_truth(seed=0, **ACCEPTANCE)
    true_ll = torch.nn.functional.binary_cross_entropy_with_logits(
        truth.logits(ids, dense_x), labels.double(), reduction="none")
    optimum = w.info["optimal_logloss"]
    assert w.target is not None and w.target.reached(metrics["logloss"]), (
        metrics["logloss"] / optimum)
    # ... and no model beats the ground truth by more than the eval sample's noise
    noise = float((model_ll - true_ll).std()) / math.sqrt(len(labels))
    assert metrics["logloss"] > optimum - 4 * noise
    assert w.info["optimal_auc"] - 0.02 < metrics["auc"] < w.info["optimal_auc"] + 0.005
    assert time.perf_counter() - start < 60
