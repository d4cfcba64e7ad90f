r"""The ``ctr`` workload: click-through-rate prediction with embedding tables.

``ctr(seed=0, **options)`` (the options are its keyword parameters) builds a
:class:`~gradguard.run.workload.Workload` from one of three sources (option
``source``):

``"synthetic"`` (default)
    Click logs drawn from a **known** logistic model, so the best achievable
    (Bayes-optimal) log-loss is known; see :class:`GroundTruth` for the exact
    generative model. The documented target is an eval log-loss within 2% of that
    optimum: ``Target("logloss", 1.02 * info["optimal_logloss"], "min")``.
``"criteo"``
    A Criteo-format TSV file (``label``, 13 integer columns, 26 hexadecimal
    categorical columns; empty fields allowed; plain or gzip), categorical values
    hashed into ``hash_buckets`` rows per field (``zlib.crc32``, stable across
    processes). No target (the optimum of real data is unknown).
``"libsvm"``
    A libsvm/svmlight file (``label index:value ...``, labels in {0, 1} or
    {-1, +1}), read with scikit-learn. No target.

**Model.** For the two categorical sources (:class:`CTRNet`): one table
``embeddings`` of ``embedding_dim`` columns *shared* by the 26 fields (field
``f``'s id ``i`` is row ``offsets[f] + i``; an ``nn.Embedding``, since each field's
bag holds one id: the same lookup as ``nn.EmbeddingBag``, several times faster on
CPU), and one shared ``nn.EmbeddingBag`` table ``wide`` of one column (a per-id
scalar, the first-order term of wide & deep / DeepFM models) whose bag is the
sample's 26 rows, summed. The logit is

.. math::
    \hat z = \sum_f \mathrm{wide}[o_f + i_f]
        + \mathrm{MLP}\big([e_{o_0 + i_0}, \dots, e_{o_{25} + i_{25}},
          (\operatorname{slog}(x) - \mu) / \sigma]\big),
    \qquad \operatorname{slog}(x) = \operatorname{sign}(x)\log(1 + |x|),

with ``x`` the 13 raw dense values (``slog`` is ``log1p`` for counts; it keeps the
sign of Criteo's few negative values), :math:`\mu, \sigma` their training-split
mean and standard deviation after ``slog`` (buffers), and the MLP ``hidden`` ReLU
layers then one output. For ``"libsvm"`` (:class:`SparseFeatureNet`) the
``embeddings`` bag of a row is its features weighted by their values
(``per_sample_weights``: a linear map of the sparse vector to ``embedding_dim``
numbers), ``wide`` the same with one column (logistic regression), and the logit
is ``wide + MLP(bag)``.

Both tables are ``sparse=True`` by default (sparse gradients, as
:class:`gradguard.optim.RowWiseAdagrad` takes them); ``Workload.embeddings`` names
them (``["embeddings.weight", "wide.weight"]``), the rest (the MLP) is dense: the
intended optimizer is ``Hybrid(RowWiseAdagrad on the embeddings, AdamW on the
rest)``.

**Training it.** Measured on 2 CPU cores, batch 512, ``Hybrid`` of
``RowWiseAdagrad(lr=0.05)`` on the tables and ``AdamW(lr=2e-3)`` on the MLP: the
default data set (1M training rows, generated in about 2 s) reaches the target
after 500 to 1000 steps and ends 1.1-1.4% above the optimum after 1500 steps
(about 7 s; seeds 0-2). ``weight_decay=1e-3`` on the tables (row-wise Adagrad's
L2 mode) reaches it within 500 steps and ends 0.7% above after 3000; without it,
rarely seen ids overfit when epochs repeat (the log-loss creeps back up).

**Loss and metrics.** The loss is the mean binary cross-entropy with logits;
metrics are ``logloss`` (primary, lower is better) and ``auc`` (exact, rank based,
ties counted one half). AUC is not a mean over samples, so ``evaluate`` must be
called **once on the whole eval split**, not on chunks; ``info["eval_whole_split"]``
is True to say so (``evaluate`` chunks the forward pass itself).

**Data layout.** Every split is ``TensorData((ids, dense, labels))`` with ``ids``
(n, 26) int32 per-field ids (``0 <= ids[:, f] < table_sizes[f]``), ``dense`` (n, 13)
float32 raw values and ``labels`` (n,) float32 in {0, 1}; for libsvm
``(indices, values, labels)`` with ``indices`` (n, k) int64 table rows padded with
the padding row and ``values`` (n, k) float32 padded with 0.

**Slices** (synthetic and Criteo): ``head``, the eval rows whose field-0 id is
among the most frequent 1% of field 0's ids (by the true Zipf rank for synthetic
data, by training-split frequency for Criteo), and ``tail``, the other rows.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..workload import Batch, Target, TensorData, Workload
from . import _ctr_io

N_FIELDS = 26
"""Categorical fields (Criteo's C1..C26)."""
N_DENSE = 13
"""Dense numeric fields (Criteo's I1..I13)."""

DEFAULT_VOCAB: tuple[int, ...] = (
    1000, 300, 2000, 500, 100, 1500, 3000, 800, 200, 1200, 600, 2500, 400,
    1000, 150, 700, 2000, 300, 900, 5000, 250, 1100, 450, 1800, 120, 650,
)
"""Default vocabulary sizes of the 26 synthetic fields (hundreds to a few thousand ids)."""

DENSE_LOG_MEAN: tuple[float, ...] = (
    0.5, 1.5, 2.5, -0.5, 3.5, 1.0, 0.0, 2.0, -1.0, 4.5, 1.5, 0.5, 3.0)
r""":math:`m_j`: the log-normal location of dense field ``j`` (see :class:`GroundTruth`)."""
DENSE_LOG_SCALE: tuple[float, ...] = (
    1.0, 1.2, 1.5, 0.8, 1.3, 1.0, 1.4, 0.9, 1.1, 1.6, 0.7, 1.2, 1.0)
r""":math:`s_j`: the log-normal scale of dense field ``j`` (see :class:`GroundTruth`)."""
DENSE_PAIRS: tuple[tuple[int, int], ...] = ((0, 1), (2, 3), (4, 5))
"""The dense-field pairs of the ground truth's interaction terms."""

EFFECT_DECAY = 0.75
r""":math:`\kappa`: the per-id effect of the rank-``r`` id scales as :math:`r^{-\kappa}`."""
CATEGORICAL_VARIANCE = 1.2
"""Variance of the categorical part of the true logit (sum over the 26 fields)."""
DENSE_VARIANCE = 0.5
"""Variance of the dense part of the true logit."""
BASE_CTR = 0.22
"""The mean true click probability the bias is calibrated to."""
REFERENCE_ROWS = 1 << 16
"""Size of the reference sample that fixes the ground truth's constants (see GroundTruth)."""
HEAD_FRACTION = 0.01
"""The ``head`` slice: field-0 ids among this fraction of the most frequent ones."""
EVAL_CHUNK = 1 << 16
"""Rows per forward pass in ``evaluate``."""

MAX_VOCAB = 10_000_000
"""The largest vocabulary of a synthetic field (option ``vocab``)."""
SOURCES = ("synthetic", "criteo", "libsvm")
"""The values of option ``source``."""
CRITEO_HASH_BUCKETS = 1 << 16
"""Default rows per Criteo field (option ``hash_buckets``)."""

_SYNTHETIC_ONLY = ("n_train", "n_eval", "vocab", "zipf")
_FILE_ONLY = ("path", "eval_fraction", "hash_buckets", "max_rows")


# --------------------------------------------------------------------------- options
def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"ctr: option {name!r} = {value!r} is invalid; allowed: {allowed}")


def _int(name: str, value: Any, low: int, allowed: str | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise _bad(name, value, allowed or f"an integer >= {low}")
    return int(value)


def _same(a: Any, b: Any) -> bool:
    """Equal, lists and tuples alike (a TOML array against a tuple default)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def _options(seed: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """Validate ``seed`` and ``options``; return every option, defaults filled in.

    An option of the other kind of source (``_SYNTHETIC_ONLY``, ``_FILE_ONLY``) is
    refused when its value differs from its default: a config listing every default
    works for each source, while ``path`` without ``source`` is caught.
    """
    _int("seed", seed, 0, "an integer >= 0")
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"ctr: unknown option(s) {', '.join(map(repr, unknown))}; known "
                         f"options: {', '.join(DEFAULTS)}")
    source = options.get("source", DEFAULTS["source"])
    if source not in SOURCES:
        raise _bad("source", source, " | ".join(map(repr, SOURCES)))
    foreign = _FILE_ONLY if source == "synthetic" else _SYNTHETIC_ONLY
    for name in foreign:
        if name in options and not _same(options[name], DEFAULTS[name]):
            applies = "'criteo' and 'libsvm'" if source == "synthetic" else "'synthetic'"
            raise ValueError(f"ctr: option {name!r} = {options[name]!r} does not apply to "
                             f"source={source!r} (it applies to source {applies})")
    o = {**DEFAULTS, **options}
    o["n_train"] = _int("n_train", o["n_train"], 1)
    o["n_eval"] = _int("n_eval", o["n_eval"], 2)
    vocab = o["vocab"]
    if isinstance(vocab, (int, np.integer)) and not isinstance(vocab, bool):
        vocab = [vocab] * N_FIELDS
    if (not isinstance(vocab, Sequence) or isinstance(vocab, str) or len(vocab) != N_FIELDS
            or any(isinstance(v, bool) or not isinstance(v, (int, np.integer))
                   or not 2 <= v <= MAX_VOCAB for v in vocab)):
        raise _bad("vocab", o["vocab"], f"an integer in [2, {MAX_VOCAB}] or a list of "
                   f"{N_FIELDS} such integers")
    o["vocab"] = tuple(int(v) for v in vocab)
    zipf = o["zipf"]
    if (isinstance(zipf, bool) or not isinstance(zipf, (int, float)) or not math.isfinite(zipf)
            or not 0 < zipf <= 5):
        raise _bad("zipf", zipf, "a number in (0, 5]")
    o["zipf"] = float(zipf)
    o["embedding_dim"] = _int("embedding_dim", o["embedding_dim"], 1)
    hidden = o["hidden"]
    if (not isinstance(hidden, Sequence) or isinstance(hidden, str)
            or any(isinstance(h, bool) or not isinstance(h, (int, np.integer)) or h < 1
                   for h in hidden)):
        raise _bad("hidden", hidden, "a list of positive integers (layer widths; [] for none)")
    o["hidden"] = tuple(int(h) for h in hidden)
    if not isinstance(o["sparse"], bool):
        raise _bad("sparse", o["sparse"], "true or false")
    if source != "synthetic":
        path = o["path"]
        if path is None:
            raise ValueError(f"ctr: source={source!r} needs option 'path' (the data file)")
        if not isinstance(path, (str, Path)) or str(path) == "":
            raise _bad("path", path, "a file path (string)")
        fraction = o["eval_fraction"]
        if (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                or not 0 < fraction < 1):
            raise _bad("eval_fraction", fraction, "a number strictly between 0 and 1")
        o["eval_fraction"] = float(fraction)
        if o["hash_buckets"] is None:
            o["hash_buckets"] = CRITEO_HASH_BUCKETS if source == "criteo" else None
        else:
            o["hash_buckets"] = _int("hash_buckets", o["hash_buckets"], 2)
        if o["max_rows"] is not None:
            o["max_rows"] = _int("max_rows", o["max_rows"], 2, "an integer >= 2 or none")
    return o


# ---------------------------------------------------------------------- ground truth
def _zipf_probabilities(size: int, exponent: float) -> np.ndarray:
    weights = np.arange(1, size + 1, dtype=np.float64) ** -exponent
    return weights / weights.sum()


class _ZipfTable:
    r"""Exact inversion of a discrete law from 32-bit uniform integers, with a guide table.

    With thresholds :math:`t_k = \lfloor 2^{32} \sum_{i \le k} p_i \rfloor`, the rank
    of a uniform 32-bit integer :math:`u` is the number of thresholds :math:`\le u`
    (so :math:`P(\text{rank} = k) = p_k` up to :math:`2^{-32}`). A table over the top
    16 bits of :math:`u` answers directly for cells without a threshold inside; the
    rest (at most one cell per rank) are binary-searched.
    """

    def __init__(self, probabilities: np.ndarray) -> None:
        cdf = np.cumsum(probabilities)[:-1]
        self.thresholds = np.floor(cdf * 2.0**32).astype(np.uint64)
        starts = np.arange(1 << 16, dtype=np.uint64) << np.uint64(16)
        low = np.searchsorted(self.thresholds, starts, side="right")
        high = np.searchsorted(self.thresholds, starts + np.uint64(0xFFFF), side="right")
        self.table = low.astype(np.int32)
        self.ambiguous = low != high

    def ranks(self, bits: np.ndarray) -> np.ndarray:
        """0-based ranks of uniform uint32 ``bits``."""
        cells = bits >> np.uint32(16)
        ranks = self.table[cells]
        unsure = np.flatnonzero(self.ambiguous[cells])
        ranks[unsure] = np.searchsorted(self.thresholds, bits[unsure].astype(np.uint64),
                                        side="right")
        return ranks


@dataclass(frozen=True, eq=False)
class GroundTruth:
    r"""The known model behind the synthetic click logs.

    Each sample is drawn independently:

    * **Categorical fields** :math:`f = 0..25` with :math:`V_f` ids (``vocab``): a rank
      :math:`R_f \in \{1..V_f\}` with the Zipf law
      :math:`P(R_f = r) = r^{-s} / \sum_{k=1}^{V_f} k^{-s}` (``s = zipf``); the
      observed id is :math:`i_f = \pi_f(R_f)` for a fixed random permutation
      :math:`\pi_f` onto :math:`\{0..V_f-1\}` (``ids_by_rank[f]``), so an id's value
      says nothing about its frequency.
    * **Dense fields** :math:`j = 0..12`: a count
      :math:`x_j = \lfloor \exp(m_j + s_j\xi_j) \rfloor`, :math:`\xi_j \sim N(0, 1)`
      (a discretised log-normal, computed in float32: non-negative integers,
      heavy-tailed, mostly zeros where :math:`m_j < 0`; :math:`m, s` are
      ``DENSE_LOG_MEAN`` and ``DENSE_LOG_SCALE``). Write
      :math:`u_j = (\log(1 + x_j) - c_j) / d_j` (``dense_center``, ``dense_scale``).
    * **Label** :math:`y \sim \mathrm{Bernoulli}(\sigma(z))`, with the true logit

      .. math::
          z = b + \sum_{f} w_f[i_f] + \sum_{j} a_j u_j
              + \sum_{(p, q)} c_{pq} \tanh(u_p) \tanh(u_q),

      the pairs :math:`(p, q)` being ``DENSE_PAIRS``. No other feature matters, so
      :math:`\sigma(z)` is the Bayes-optimal prediction and the eval log-loss of
      :math:`z` is the best any model can reach (up to the eval sample's noise).

    The constants come from the seed. The effect of field :math:`f`'s rank-:math:`r`
    id is :math:`w_f[\pi_f(r)] = \gamma_f\, \varepsilon_{f,r}\, r^{-\kappa} / \tau_f`
    with :math:`\varepsilon_{f,r} \sim N(0, 1)`, :math:`\kappa` = ``EFFECT_DECAY``
    (frequent ids have large effects, rare ids small ones), :math:`\tau_f` the
    standard deviation of :math:`\varepsilon_{f,R} R^{-\kappa}` under the Zipf law (so
    field :math:`f`'s term has variance :math:`\gamma_f^2`) and
    :math:`\gamma_f \propto \mathrm{Uniform}(0.2, 1)` scaled so that
    :math:`\sum_f \gamma_f^2` = ``CATEGORICAL_VARIANCE``. :math:`a_j, c_{pq} \sim
    N(0, 1)`, then scaled together so that the dense term has variance
    ``DENSE_VARIANCE``. These last two, :math:`c_j, d_j` (mean and standard
    deviation of :math:`\log(1 + x_j)`) and the bias :math:`b` (bisection: the mean
    of :math:`\sigma(z)` is ``BASE_CTR``) are measured on a reference sample of
    ``REFERENCE_ROWS`` rows from its own random stream, so the ground truth depends
    on ``seed``, ``vocab`` and ``zipf`` only, not on ``n_train`` or ``n_eval``.
    """

    vocab: tuple[int, ...]
    zipf: float
    rank_probabilities: tuple[np.ndarray, ...]
    """Per field: :math:`P(R_f = r)` for ranks :math:`r = 1..V_f` (index ``r - 1``)."""
    ids_by_rank: tuple[np.ndarray, ...]
    r"""Per field: :math:`\pi_f`, the id of rank ``r`` at index ``r - 1`` (int32)."""
    effects: tuple[np.ndarray, ...]
    """Per field: :math:`w_f`, indexed by id."""
    dense_center: np.ndarray
    dense_scale: np.ndarray
    linear: np.ndarray
    r""":math:`a_j`."""
    pair_weights: np.ndarray
    r""":math:`c_{pq}` for the pairs of ``DENSE_PAIRS``."""
    bias: float
    tables: tuple[_ZipfTable, ...]

    @staticmethod
    def create(seed: int, vocab: Sequence[int], zipf: float) -> GroundTruth:
        """The ground truth of ``seed`` (see the class docstring for the construction)."""
        constants, reference = (np.random.Generator(np.random.PCG64(s)) for s in
                                np.random.SeedSequence([seed, 0x5C7]).spawn(2))
        probabilities, ids_by_rank, raw = [], [], []
        for size in vocab:
            p = _zipf_probabilities(size, zipf)
            effect = constants.standard_normal(size) * np.arange(1, size + 1) ** -EFFECT_DECAY
            probabilities.append(p)
            ids_by_rank.append(constants.permutation(size).astype(np.int32))
            raw.append(effect / math.sqrt(max(p @ effect**2 - (p @ effect) ** 2, 1e-300)))
        gamma = constants.uniform(0.2, 1.0, len(vocab))
        gamma *= math.sqrt(CATEGORICAL_VARIANCE / float(gamma @ gamma))
        effects = []
        for f, size in enumerate(vocab):
            by_id = np.empty(size)
            by_id[ids_by_rank[f]] = gamma[f] * raw[f]
            effects.append(by_id)
        linear = constants.standard_normal(N_DENSE)
        pairs = constants.standard_normal(len(DENSE_PAIRS))
        truth = GroundTruth(
            vocab=tuple(vocab), zipf=zipf, rank_probabilities=tuple(probabilities),
            ids_by_rank=tuple(ids_by_rank), effects=tuple(effects),
            dense_center=np.zeros(N_DENSE), dense_scale=np.ones(N_DENSE), linear=linear,
            pair_weights=pairs, bias=0.0,
            tables=tuple(_ZipfTable(p) for p in probabilities))
        _, counts, categorical = truth._features(REFERENCE_ROWS, reference)
        logs = np.log1p(counts.astype(np.float64))
        scale = logs.std(axis=0)
        truth = replace(truth, dense_center=logs.mean(axis=0),
                        dense_scale=np.where(scale > 0, scale, 1.0))
        factor = math.sqrt(DENSE_VARIANCE / max(float(truth._dense_term(counts).var()), 1e-300))
        truth = replace(truth, linear=linear * factor, pair_weights=pairs * factor)
        partial = categorical + truth._dense_term(counts)
        return replace(truth, bias=_calibrate(partial, BASE_CTR))

    # -- sampling --------------------------------------------------------------
    def _features(self, n: int, rng: np.random.Generator,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ids (n, 26) int32, counts (n, 13) float32 and the categorical term (n,) float64."""
        ids = np.empty((len(self.vocab), n), dtype=np.int32)
        categorical = np.zeros(n)
        for f, table in enumerate(self.tables):
            bits = rng.integers(0, 1 << 32, size=n, dtype=np.uint32)
            ids[f] = self.ids_by_rank[f][table.ranks(bits)]
            categorical += self.effects[f][ids[f]]
        normal = rng.standard_normal((n, N_DENSE), dtype=np.float32)
        normal *= np.asarray(DENSE_LOG_SCALE, dtype=np.float32)
        normal += np.asarray(DENSE_LOG_MEAN, dtype=np.float32)
        counts = np.floor(np.exp(normal))
        return np.ascontiguousarray(ids.T), counts, categorical

    def sample(self, n: int, rng: np.random.Generator,
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``n`` samples: ids (n, 26) int32, counts (n, 13) float32, labels (n,) float32 and
        the true logits (n,) float64 (the same as :meth:`logits_np` of the ids and counts)."""
        ids, counts, categorical = self._features(n, rng)
        logits = self.bias + categorical + self._dense_term(counts)
        labels = (rng.random(n) < _sigmoid(logits)).astype(np.float32)
        return ids, counts, labels, logits

    # -- the true logit ------------------------------------------------------------
    def _dense_term(self, counts: np.ndarray) -> np.ndarray:
        u = (np.log1p(np.asarray(counts, dtype=np.float64)) - self.dense_center) / self.dense_scale
        term = u @ self.linear
        squashed = np.tanh(u)
        for weight, (p, q) in zip(self.pair_weights, DENSE_PAIRS, strict=True):
            term += weight * squashed[:, p] * squashed[:, q]
        return term

    def logits_np(self, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The true logit :math:`z` (float64) of ids (n, 26) and raw counts (n, 13)."""
        ids = np.asarray(ids)
        categorical = np.zeros(ids.shape[0])
        for f, effect in enumerate(self.effects):
            categorical += effect[ids[:, f]]
        return self.bias + categorical + self._dense_term(counts)

    def logits(self, ids: Tensor, dense: Tensor) -> Tensor:
        """The true logit (float64 tensor) of a batch's ``ids`` and ``dense`` tensors."""
        return torch.from_numpy(self.logits_np(ids.cpu().numpy(), dense.cpu().numpy()))

    def head_ids(self, field: int = 0, fraction: float = HEAD_FRACTION) -> np.ndarray:
        """The ids of ``field`` whose Zipf rank is among the first ``fraction`` (at least one)."""
        count = max(1, math.ceil(fraction * self.vocab[field]))
        return self.ids_by_rank[field][:count]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _calibrate(logits: np.ndarray, rate: float) -> float:
    """The ``b`` with ``mean(sigmoid(logits + b)) == rate`` (bisection)."""
    low, high = -30.0, 30.0
    for _ in range(80):
        middle = 0.5 * (low + high)
        if _sigmoid(logits + middle).mean() < rate:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def ground_truth(*, seed: int = 0, **options: Any) -> GroundTruth:
    """The :class:`GroundTruth` that ``ctr(seed=seed, **options)`` draws its synthetic data from."""
    o = _options(seed, options)
    if o["source"] != "synthetic":
        raise ValueError(f"ctr: source={o['source']!r} has no ground truth (only 'synthetic')")
    return GroundTruth.create(seed, o["vocab"], o["zipf"])


# ---------------------------------------------------------------------------- metrics
def auc(scores: Tensor, labels: Tensor) -> float:
    """Exact ROC AUC: the Mann-Whitney rank statistic, tied scores sharing their mean rank.

    :math:`(\\sum_{\\text{positives}} \\mathrm{rank} - n_+(n_+ + 1)/2) / (n_+ n_-)`,
    ranks 1-based over ascending scores (a tie between a positive and a negative
    counts one half, as ``sklearn.metrics.roc_auc_score``). NaN when ``labels`` holds
    one class only or a score is NaN. ``labels``: 1 (or True) is positive.
    """
    scores = scores.detach().reshape(-1).to(torch.float64)
    positive = labels.detach().reshape(-1) > 0.5
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0 or bool(torch.isnan(scores).any()):
        return float("nan")
    ordered, order = torch.sort(scores)
    _, counts = torch.unique_consecutive(ordered, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    mean_rank = ends - (counts.to(torch.float64) - 1.0) / 2.0
    ranks = torch.repeat_interleave(mean_rank, counts)
    rank_sum = float(ranks[positive[order]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def logloss(logits: Tensor, labels: Tensor) -> float:
    """Mean binary cross-entropy of ``logits`` against 0/1 ``labels`` (computed in float64)."""
    return float(F.binary_cross_entropy_with_logits(
        logits.detach().reshape(-1).to(torch.float64),
        labels.detach().reshape(-1).to(torch.float64)))


def _constant_logloss(rate: float, labels: np.ndarray) -> float:
    rate = min(max(rate, 1e-12), 1 - 1e-12)
    y = labels.astype(np.float64)
    return float(-(y * math.log(rate) + (1 - y) * math.log(1 - rate)).mean())


# ----------------------------------------------------------------------------- models
def _mlp(width: int, hidden: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _signed_log1p(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


class CTRNet(nn.Module):
    """Embedding tables shared by 26 categorical fields + an MLP (see the module docstring).

    ``forward(ids, dense)``: ``ids`` (n, 26) integer per-field ids, ``dense`` (n, 13)
    raw values; returns (n,) logits. ``embeddings`` is an ``nn.Embedding`` (each
    field's "bag" is its one id: the same lookup as ``nn.EmbeddingBag``, several
    times faster on CPU), ``wide`` an ``nn.EmbeddingBag`` summing a sample's 26 rows.
    """

    offsets: Tensor
    dense_mean: Tensor
    dense_std: Tensor
    mlp: nn.Sequential

    def __init__(self, table_sizes: Sequence[int], embedding_dim: int, hidden: Sequence[int],
                 dense_mean: Tensor, dense_std: Tensor, *, sparse: bool = True) -> None:
        super().__init__()
        sizes = torch.tensor([0, *table_sizes], dtype=torch.int64)
        self.register_buffer("offsets", torch.cumsum(sizes, 0)[:-1].clone())
        self.register_buffer("dense_mean", dense_mean.to(torch.float32).clone())
        self.register_buffer("dense_std", dense_std.to(torch.float32).clone())
        rows = int(sizes.sum())
        self.embeddings = nn.Embedding(rows, embedding_dim, sparse=sparse)
        self.wide = nn.EmbeddingBag(rows, 1, mode="sum", sparse=sparse)
        self.mlp = _mlp(len(table_sizes) * embedding_dim + dense_mean.numel(), hidden)
        with torch.no_grad():
            self.embeddings.weight.normal_(0.0, 0.05)
            self.wide.weight.zero_()

    def forward(self, ids: Tensor, dense: Tensor) -> Tensor:
        rows = ids.to(torch.int64) + self.offsets
        n = rows.shape[0]
        deep = self.embeddings(rows).reshape(n, -1)
        wide = self.wide(rows).reshape(n)
        x = (_signed_log1p(dense.to(self.dense_mean.dtype)) - self.dense_mean) / self.dense_std
        return wide + self.mlp(torch.cat([deep, x], dim=1)).reshape(n)


class SparseFeatureNet(nn.Module):
    """Value-weighted embedding bags over sparse numeric features + an MLP (libsvm data).

    ``forward(indices, values)``: ``indices`` (n, k) table rows (the padding row
    ``rows`` in empty slots), ``values`` (n, k) feature values; returns (n,) logits
    ``wide(x) + MLP(embeddings(x))``, each bag the sum of its rows weighted by the values.
    """

    mlp: nn.Sequential

    def __init__(self, rows: int, embedding_dim: int, hidden: Sequence[int], *,
                 sparse: bool = True) -> None:
        super().__init__()
        self.embeddings = nn.EmbeddingBag(rows + 1, embedding_dim, mode="sum", sparse=sparse,
                                          padding_idx=rows)
        self.wide = nn.EmbeddingBag(rows + 1, 1, mode="sum", sparse=sparse, padding_idx=rows)
        self.mlp = _mlp(embedding_dim, hidden)
        with torch.no_grad():
            self.embeddings.weight.normal_(0.0, 0.05)
            self.embeddings.weight[rows].zero_()
            self.wide.weight.zero_()

    def forward(self, indices: Tensor, values: Tensor) -> Tensor:
        n = indices.shape[0]
        indices = indices.to(torch.int64)
        values = values.to(self.embeddings.weight.dtype)
        bag = self.embeddings(indices, per_sample_weights=values)
        wide = self.wide(indices, per_sample_weights=values.to(self.wide.weight.dtype)).reshape(n)
        return wide + self.mlp(bag).reshape(n)


def _start_at_rate(model: CTRNet | SparseFeatureNet, rate: float) -> None:
    """Make the untrained model predict ``rate``: the MLP's last bias is its logit."""
    rate = min(max(rate, 1e-4), 1 - 1e-4)
    last = model.mlp[-1]
    assert isinstance(last, nn.Linear)
    with torch.no_grad():
        last.bias.fill_(math.log(rate / (1 - rate)))


def _loss(model: nn.Module, batch: Batch) -> Tensor:
    """Mean binary cross-entropy with logits; the last tensor of ``batch`` is the labels."""
    *inputs, labels = batch
    logits = model(*inputs)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def _evaluate(model: nn.Module, batch: Batch) -> dict[str, float]:
    """``logloss`` and ``auc`` of ``batch``; AUC is exact only when ``batch`` is the whole split."""
    *inputs, labels = batch
    with torch.no_grad():
        logits = torch.cat([model(*(t[i:i + EVAL_CHUNK] for t in inputs))
                            for i in range(0, labels.shape[0], EVAL_CHUNK)])
    return {"logloss": logloss(logits, labels), "auc": auc(logits, labels)}


def _split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows), each sorted: a seeded permutation's first
    ``round(fraction * n)`` rows (at least 1, at most ``n - 1``) go to eval."""
    n_eval = min(max(1, round(fraction * n)), n - 1)
    order = np.random.Generator(np.random.PCG64([seed, 0x5C8])).permutation(n)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def _tensors(*arrays: np.ndarray) -> TensorData:
    return TensorData(tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays))


# ---------------------------------------------------------------------------- factory
def ctr(*, seed: int = 0, source: str = "synthetic", n_train: int = 1_000_000,
        n_eval: int = 50_000, vocab: int | Sequence[int] = DEFAULT_VOCAB, zipf: float = 1.1,
        embedding_dim: int = 8, hidden: Sequence[int] = (64, 32), sparse: bool = True,
        path: str | None = None, eval_fraction: float = 0.1, hash_buckets: int | None = None,
        max_rows: int | None = None, **unknown: Any) -> Workload:
    """The click-through-rate workload (see the module docstring).

    The options are the keyword parameters after ``seed``; any other keyword is
    refused with a ``ValueError`` that lists them. Options of the other kind of
    source (``n_train``, ``n_eval``, ``vocab``, ``zipf`` for files; ``path``,
    ``eval_fraction``, ``hash_buckets``, ``max_rows`` for synthetic data) must keep
    their defaults.

    Args:
        seed: seeds the data (synthetic: the ground truth and the train and eval
            samples; files: the train/eval split) and the model's initial weights.
        source: ``"synthetic"`` (default), ``"criteo"`` or ``"libsvm"``.
        n_train: synthetic training samples (default 1000000).
        n_eval: synthetic eval samples (default 50000).
        vocab: ids per synthetic field: one int for all 26 fields or a list of 26
            (default :data:`DEFAULT_VOCAB`: 100 to 5000), each >= 2.
        zipf: the Zipf exponent of the synthetic ids, in (0, 5] (default 1.1).
        embedding_dim: columns of the ``embeddings`` table (default 8).
        hidden: the MLP's hidden widths (default ``[64, 32]``; ``[]``: none).
        sparse: sparse embedding gradients (``sparse=True`` tables, default True).
        path: the data file (required by ``"criteo"`` and ``"libsvm"``).
        eval_fraction: share of a file's rows held out for eval, in (0, 1)
            (default 0.1).
        hash_buckets: Criteo: rows of each field's table (default 65536; row 0 is
            the missing value); libsvm: a feature's row is its index modulo
            ``hash_buckets`` (default: one row per feature, no hashing).
        max_rows: read only the first ``max_rows`` rows of the file (default: all).

    Returns:
        the :class:`~gradguard.run.workload.Workload` (``name="ctr"``). ``info``
        holds ``source``, ``n_train``, ``n_eval``, ``base_rate`` (the training
        labels' mean), ``base_logloss`` (eval log-loss of always predicting
        ``base_rate``), ``eval_whole_split`` (True: call ``evaluate`` once on the
        whole eval split) and, for synthetic data, ``optimal_logloss`` and
        ``optimal_auc`` (eval log-loss and AUC of the true probabilities).

    Raises:
        ValueError: an unknown option, an invalid value or an option of another
            source; a malformed file (``_ctr_io.CTRFileError``, naming the file,
            the line and what was expected).
        FileNotFoundError: ``path`` does not exist.
    """
    given = {name: value for name, value in locals().items() if name in DEFAULTS}
    o = _options(seed, {**given, **unknown})
    if o["source"] == "synthetic":
        return _synthetic(seed, o)
    if o["source"] == "criteo":
        return _criteo(seed, o)
    return _libsvm(seed, o)


DEFAULTS: dict[str, Any] = {
    name: p.default for name, p in inspect.signature(ctr).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "seed"}
"""Every option of :func:`ctr` and its default (``hash_buckets=None``: 65536 rows per
field for Criteo, no hashing for libsvm; ``path`` is required by the file sources)."""


def _common_info(o: dict[str, Any], train_labels: np.ndarray, eval_labels: np.ndarray,
                 ) -> dict[str, Any]:
    base_rate = float(train_labels.astype(np.float64).mean())
    return {"source": o["source"], "n_train": int(train_labels.shape[0]),
            "n_eval": int(eval_labels.shape[0]), "base_rate": base_rate,
            "base_logloss": _constant_logloss(base_rate, eval_labels),
            "eval_whole_split": True, "embedding_dim": o["embedding_dim"],
            "hidden": list(o["hidden"]), "sparse": o["sparse"]}


def _categorical(seed: int, o: dict[str, Any], table_sizes: Sequence[int],
                 train: tuple[np.ndarray, np.ndarray, np.ndarray],
                 eval_: tuple[np.ndarray, np.ndarray, np.ndarray], head: np.ndarray,
                 info: dict[str, Any], target: Target | None) -> Workload:
    """The workload of 26 categorical + 13 dense fields (synthetic and Criteo data)."""
    train_data, eval_data = _tensors(*train), _tensors(*eval_)
    logs = _signed_log1p(train_data.tensors[1])
    std = logs.std(dim=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CTRNet(table_sizes, o["embedding_dim"], o["hidden"], logs.mean(dim=0),
                       torch.where(std > 0, std, torch.ones_like(std)), sparse=o["sparse"])
    info = {**_common_info(o, train[2], eval_[2]), **info, "table_rows": int(sum(table_sizes))}
    _start_at_rate(model, info["base_rate"])
    head_mask = torch.from_numpy(np.ascontiguousarray(head, dtype=bool))
    return Workload(
        name="ctr", model=model, train=train_data, eval=eval_data, loss=_loss,
        evaluate=_evaluate, primary_metric="logloss", mode="min", target=target,
        embeddings=["embeddings.weight", "wide.weight"],
        slices={"head": head_mask, "tail": ~head_mask}, info=info)


def _synthetic(seed: int, o: dict[str, Any]) -> Workload:
    truth = GroundTruth.create(seed, o["vocab"], o["zipf"])
    train_rng, eval_rng = (np.random.Generator(np.random.PCG64(s)) for s in
                           np.random.SeedSequence([seed, 0x5C9]).spawn(2))
    train_ids, train_counts, train_labels, _ = truth.sample(o["n_train"], train_rng)
    eval_ids, eval_counts, eval_labels, eval_logits = truth.sample(o["n_eval"], eval_rng)
    z, y = torch.from_numpy(eval_logits), torch.from_numpy(eval_labels)
    optimal = logloss(z, y)
    info = {"vocab": list(o["vocab"]), "zipf": o["zipf"], "optimal_logloss": optimal,
            "optimal_auc": auc(z, y), "true_ctr": float(_sigmoid(eval_logits).mean())}
    return _categorical(
        seed, o, o["vocab"], (train_ids, train_counts, train_labels),
        (eval_ids, eval_counts, eval_labels), np.isin(eval_ids[:, 0], truth.head_ids(0)),
        info, Target(metric="logloss", value=1.02 * optimal, mode="min"))


def _criteo(seed: int, o: dict[str, Any]) -> Workload:
    buckets = o["hash_buckets"]
    data = _ctr_io.read_criteo(o["path"], hash_buckets=buckets, max_rows=o["max_rows"])
    _check_rows(data.labels.shape[0], o["path"])
    train, held = _split(data.labels.shape[0], o["eval_fraction"], seed)
    values, counts = np.unique(data.categorical[train, 0], return_counts=True)
    top = max(1, math.ceil(HEAD_FRACTION * values.size))
    head_ids = values[np.argsort(-counts, kind="stable")[:top]]
    return _categorical(
        seed, o, [buckets] * N_FIELDS,
        (data.categorical[train], data.dense[train], data.labels[train]),
        (data.categorical[held], data.dense[held], data.labels[held]),
        np.isin(data.categorical[held, 0], head_ids),
        {"path": str(o["path"]), "hash_buckets": buckets}, None)


def _libsvm(seed: int, o: dict[str, Any]) -> Workload:
    data = _ctr_io.read_libsvm(o["path"], max_rows=o["max_rows"])
    _check_rows(data.labels.shape[0], o["path"])
    buckets = o["hash_buckets"]
    rows = max(1, data.n_features if buckets is None else min(buckets, data.n_features))
    indices = np.where(data.indices < 0, rows, data.indices % rows)
    train, held = _split(data.labels.shape[0], o["eval_fraction"], seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SparseFeatureNet(rows, o["embedding_dim"], o["hidden"], sparse=o["sparse"])
    info = {**_common_info(o, data.labels[train], data.labels[held]), "path": str(o["path"]),
            "n_features": data.n_features, "hash_buckets": buckets, "table_rows": rows}
    _start_at_rate(model, info["base_rate"])
    return Workload(
        name="ctr", model=model,
        train=_tensors(indices[train], data.values[train], data.labels[train]),
        eval=_tensors(indices[held], data.values[held], data.labels[held]),
        loss=_loss, evaluate=_evaluate, primary_metric="logloss", mode="min", target=None,
        embeddings=["embeddings.weight", "wide.weight"], info=info)


def _check_rows(n: int, path: Any) -> None:
    if n < 2:
        raise ValueError(f"ctr: {str(path)!r} has {n} data row(s); at least 2 are needed "
                         "to split train and eval")


__all__ = ["DEFAULTS", "CTRNet", "GroundTruth", "SparseFeatureNet", "auc", "ctr", "ground_truth",
           "logloss"]
