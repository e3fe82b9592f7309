"""How sure a retrieval number is: class-balanced means, bootstrap intervals, paired comparisons.

Every metric of ``vitp evaluate`` is a mean of a per-query value (Top-K: 1 if a hit, else 0; mAP:
the query's average precision). Two means are reported:

* **micro**: the mean over queries (the seed's numbers). A class with many easy queries (open
  water) weighs as much as its share of the queries.
* **class-balanced** (macro): the mean over classes of each class's mean; every class counts once.

95 % intervals come from a percentile bootstrap over queries (Efron & Tibshirani, *An Introduction
to the Bootstrap*, ch. 13): the metric is recomputed on resamples of the queries drawn with
replacement, and the interval is the 2.5th to 97.5th percentile of those values.

* micro: n queries drawn from all n, as for any mean of independent observations.
* class-balanced: **stratified by class** — each class's n_c queries are drawn from that class
  only. The metric gives every class the weight 1/C by definition, so how many queries each class
  happens to have is not a source of its uncertainty; the noise is which queries a class got.
  Stratifying also keeps every class in every resample (a plain resample can lose a small class,
  and its mean would be undefined). The per-class intervals come from the same resamples.
* paired differences (two methods on the same queries, matched by image path): the per-query
  difference is resampled with the same schemes. Its interval, not two overlapping intervals,
  says whether one method is ahead: only when it excludes zero.

How a resample is drawn (a test repeats it with a plain loop): uniforms ``u`` of shape
(resamples, n) come from ``numpy.random.default_rng``; slot j of a resample takes member
``floor(u[j] * n_s)`` of the stratum of query j (its members in query order; micro has one
stratum of all queries). Micro and class-balanced resamples use the two generators of
``SeedSequence(seed).spawn(2)``. Resamples are drawn in chunks, so memory stays bounded.

The intervals cover query sampling only: training the model again with another seed is a further
source of spread, which only repeating the training measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vitp.errors import RetrievalError
from vitp.files import read_json
from vitp.retrieval.metrics import class_ids

CONFIDENCE = 0.95
# Elements (resample slots x metrics) gathered at a time: about 64 MB of float64.
_CHUNK_ELEMENTS = 8 * 2**20

AHEAD, BEHIND, NO_DIFFERENCE = "ahead", "behind", "no measurable difference"


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}

    @property
    def verdict(self) -> str:
        """For a difference a - b: ``ahead`` (a is better) only when the interval excludes zero."""
        if self.low > 0:
            return AHEAD
        if self.high < 0:
            return BEHIND
        return NO_DIFFERENCE

    def format(self, digits: int = 3, signed: bool = False) -> str:
        """'value [low, high]'; a bound that is not zero never prints as zero (more digits are shown),
        so that a reader can tell whether the interval excludes zero."""
        sign = "+" if signed else ""

        def number(x: float) -> str:
            shown = digits
            while x != 0 and round(x, shown) == 0 and shown < 15:
                shown += 1
            return f"{x:{sign}.{shown}f}"

        return f"{number(self.value)} [{number(self.low)}, {number(self.high)}]"


@dataclass
class QueryResults:
    """Per-query values of an evaluation: what bootstrap and comparisons need, and what
    ``--output`` JSON stores so that two evaluations can be paired later."""

    image_paths: np.ndarray  # str [n]
    classes: np.ndarray  # str [n]
    metrics: dict[str, np.ndarray]  # name -> float [n], e.g. "Top-1" (0/1), "mAP" (AP of each query)

    def __post_init__(self) -> None:
        self.image_paths = np.asarray(self.image_paths).astype(str)
        self.classes = np.asarray(self.classes).astype(str)
        self.metrics = {name: np.asarray(values, dtype=np.float64) for name, values in self.metrics.items()}
        sizes = {len(self.image_paths), len(self.classes), *(len(v) for v in self.metrics.values())}
        if len(sizes) != 1:
            raise ValueError(f"image_paths, classes and metrics must have one value per query, got lengths {sorted(sizes)}")

    def __len__(self) -> int:
        return len(self.image_paths)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_paths": self.image_paths.tolist(),
            "classes": self.classes.tolist(),
            "metrics": {name: values.tolist() for name, values in self.metrics.items()},
        }

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "QueryResults":
        """Read ``to_dict``'s form back, saying what is wrong with a damaged or foreign one."""
        if not isinstance(data, dict) or not all(key in data for key in ("image_paths", "classes", "metrics")):
            raise RetrievalError(f"{source}: 'per_query' must be an object with image_paths, classes and metrics")
        if not isinstance(data["metrics"], dict) or not data["metrics"]:
            raise RetrievalError(f"{source}: 'per_query.metrics' must be a non-empty object of metric -> values")
        for key in ("image_paths", "classes"):
            if not isinstance(data[key], list) or not all(isinstance(v, str) for v in data[key]):
                raise RetrievalError(f"{source}: 'per_query.{key}' must be a list of strings")
        metrics = {}
        for name, values in data["metrics"].items():
            if not isinstance(values, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise RetrievalError(f"{source}: 'per_query.metrics.{name}' must be a list of numbers")
            array = np.asarray(values, dtype=np.float64)
            if len(array) and not (np.isfinite(array).all() and array.min() >= 0 and array.max() <= 1):
                raise RetrievalError(f"{source}: 'per_query.metrics.{name}' has values outside [0, 1]")
            metrics[name] = array
        try:
            return cls(data["image_paths"], data["classes"], metrics)
        except ValueError as err:
            raise RetrievalError(f"{source}: 'per_query': {err}") from None


@dataclass
class Bootstrap:
    """Micro, class-balanced and per-class intervals of each metric."""

    micro: dict[str, Interval]
    class_balanced: dict[str, Interval]
    per_class: dict[str, dict[str, Interval]]  # class -> metric -> interval
    resamples: int
    seed: int
    confidence: float = CONFIDENCE
    queries_per_class: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "resamples": self.resamples,
            "seed": self.seed,
            "confidence": self.confidence,
            "method": "percentile bootstrap over queries; class-balanced and per-class: stratified by class",
            "micro": {name: i.to_dict() for name, i in self.micro.items()},
            "class_balanced": {name: i.to_dict() for name, i in self.class_balanced.items()},
            "per_class": {c: {name: i.to_dict() for name, i in row.items()} for c, row in self.per_class.items()},
        }


def class_means(values: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class names (sorted as text) and the mean of ``values`` within each; ``classes`` holds each
    value's class name."""
    classes = np.asarray(classes)
    if classes.dtype.kind in "biuf":
        # Numbers read as names would be sorted as text ("10" before "2"), so class ids would come
        # back in another order than the names they stand for.
        raise ValueError(f"classes must be class names (strings), got {classes.dtype} values")
    names, ids = class_ids(classes)
    return names, _means_by_id(np.asarray(values, dtype=np.float64), ids, len(names))


def _means_by_id(values: np.ndarray, ids: np.ndarray, num_classes: int) -> np.ndarray:
    """The mean of ``values`` within each class id 0 .. num_classes - 1 (every id present)."""
    counts = np.bincount(ids, minlength=num_classes)
    return np.bincount(ids, weights=values, minlength=num_classes) / counts


def class_balanced_mean(values: np.ndarray, classes: np.ndarray) -> float:
    """Mean over classes of each class's mean of ``values``."""
    return float(class_means(values, classes)[1].mean())


def resample_indices(strata: np.ndarray, resamples: int, rng: np.random.Generator, chunk: int) -> Iterator[np.ndarray]:
    """Chunks of (rows, n) query indices: slot j of a row is a random member of query j's stratum."""
    strata = np.asarray(strata)
    order = np.argsort(strata, kind="stable")  # members of each stratum, in query order
    _, first, sizes = np.unique(strata[order], return_index=True, return_counts=True)
    _, stratum_of = np.unique(strata, return_inverse=True)
    start, size = first[stratum_of], sizes[stratum_of]  # per slot: where its stratum's members begin, how many
    for begin in range(0, resamples, chunk):
        uniforms = rng.random((min(chunk, resamples - begin), len(strata)))
        picked = np.minimum((uniforms * size).astype(np.int64), size - 1)  # u * n < n, unless rounding says otherwise
        yield order[start + picked]


def bootstrap(
    results: QueryResults, resamples: int, seed: int = 0, confidence: float = CONFIDENCE
) -> Bootstrap:
    """Percentile intervals of every metric of ``results`` (see the module docstring)."""
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if len(results) == 0:
        raise ValueError("results has no queries to resample")
    names = list(results.metrics)
    values = np.stack([results.metrics[name] for name in names], axis=1)  # [n, metrics]
    class_names, class_of = class_ids(results.classes)  # per_class[:, i] below is class_names[i]
    by_class = np.argsort(class_of, kind="stable")
    class_starts = np.searchsorted(class_of[by_class], np.arange(len(class_names)))
    class_sizes = np.bincount(class_of, minlength=len(class_names))
    chunk = max(1, _CHUNK_ELEMENTS // (len(results) * len(names)))
    micro_rng, macro_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))

    micro = np.concatenate([values[rows].mean(axis=1) for rows in resample_indices(
        np.zeros(len(results)), resamples, micro_rng, chunk)])  # [resamples, metrics]
    per_class = []
    for rows in resample_indices(class_of, resamples, macro_rng, chunk):
        # Slots of class c hold members of class c (stratified): sum them per class.
        sums = np.add.reduceat(values[rows][:, by_class], class_starts, axis=1)  # [rows, classes, metrics]
        per_class.append(sums / class_sizes[None, :, None])
    per_class = np.concatenate(per_class)  # [resamples, classes, metrics]
    balanced = per_class.mean(axis=1)

    tails = [(1 - confidence) / 2, 1 - (1 - confidence) / 2]
    # The observed per-class values use the same ids as the resamples, so row i is class_names[i] in both.
    observed_class = np.stack([_means_by_id(values[:, m], class_of, len(class_names)) for m in range(len(names))], axis=1)

    def interval(point: float, samples: np.ndarray) -> Interval:
        low, high = np.quantile(samples, tails)
        return Interval(float(point), float(low), float(high))

    return Bootstrap(
        micro={name: interval(values[:, m].mean(), micro[:, m]) for m, name in enumerate(names)},
        class_balanced={name: interval(observed_class[:, m].mean(), balanced[:, m]) for m, name in enumerate(names)},
        per_class={
            str(c): {name: interval(observed_class[i, m], per_class[:, i, m]) for m, name in enumerate(names)}
            for i, c in enumerate(class_names)
        },
        resamples=resamples,
        seed=seed,
        confidence=confidence,
        queries_per_class={str(c): int(n) for c, n in zip(class_names, class_sizes)},
    )


@dataclass
class Comparison:
    """a - b on the queries both evaluated: paired-bootstrap intervals of the differences."""

    name_a: str
    name_b: str
    differences: Bootstrap
    a: dict[str, dict[str, float]]  # "micro" / "class_balanced" -> metric -> value of a
    b: dict[str, dict[str, float]]
    per_class_a: dict[str, dict[str, float]]  # class -> metric -> value
    per_class_b: dict[str, dict[str, float]]
    num_queries: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.name_a,
            "b": self.name_b,
            "num_queries": self.num_queries,
            "values_a": self.a,
            "values_b": self.b,
            "per_class_a": self.per_class_a,
            "per_class_b": self.per_class_b,
            "differences": self.differences.to_dict(),
            "verdicts": {
                average: {name: i.verdict for name, i in getattr(self.differences, average).items()}
                for average in ("micro", "class_balanced")
            },
        }

    def classes_where_b_wins(self, metric: str) -> list[str]:
        """Classes whose value of ``metric`` is higher for b than for a (point estimates)."""
        return [c for c in self.per_class_a if self.per_class_b[c][metric] > self.per_class_a[c][metric]]

    def winner(self, difference: Interval) -> str:
        """The verdict on a difference, in the methods' names."""
        return {AHEAD: f"{self.name_a} ahead", BEHIND: f"{self.name_b} ahead"}.get(difference.verdict, NO_DIFFERENCE)

    def lines(self) -> list[str]:
        d = self.differences
        width_a, width_b = max(8, len(self.name_a)), max(8, len(self.name_b))
        width = max(6, *(len(name) for name in d.micro))
        header = (f"{'metric':<{width}}  {'average':<14}  {self.name_a:>{width_a}}  {self.name_b:>{width_b}}  "
                  f"{'difference [' + format(d.confidence, '.0%') + ' interval]':<30}  verdict")
        lines = [
            f"paired bootstrap: {self.name_a} - {self.name_b} on {self.num_queries} shared queries, {d.resamples} "
            f"resamples, seed {d.seed} (class-balanced: queries resampled within each class)",
            header,
            "-" * len(header),
        ]
        for name in d.micro:
            for average, label in (("micro", "micro"), ("class_balanced", "class-balanced")):
                diff = getattr(d, average)[name]
                lines.append(f"{name:<{width}}  {label:<14}  {self.a[average][name]:>{width_a}.4f}  "
                             f"{self.b[average][name]:>{width_b}.4f}  {diff.format(4, signed=True):<30}  {self.winner(diff)}")
        for name in d.micro:
            wins = self.classes_where_b_wins(name)
            if wins:
                lines.append(f"{self.name_b} is higher on {name} in: " + ", ".join(
                    f"{c} ({self.per_class_b[c][name]:.3f} vs {self.per_class_a[c][name]:.3f}, difference "
                    f"{d.per_class[c][name].format(3, signed=True)})" for c in wins))
        lines.append("a verdict names a method only where the interval of the difference excludes 0")
        return lines


def pair_queries(a: QueryResults, b: QueryResults, name_a: str = "a", name_b: str = "b") -> tuple[QueryResults, QueryResults]:
    """``a`` and ``b`` on the same queries in the same order (matched by image path), with the
    metrics both have. Refuses evaluations of different query sets or classes."""
    for results, name in ((a, name_a), (b, name_b)):
        unique, counts = np.unique(results.image_paths, return_counts=True)
        if (counts > 1).any():
            raise RetrievalError(f"{name}: the image path {str(unique[counts > 1][0])!r} appears {counts.max()} times; "
                                  "queries are paired by path, so each must be unique")
    only_a = np.setdiff1d(a.image_paths, b.image_paths)
    only_b = np.setdiff1d(b.image_paths, a.image_paths)
    if len(only_a) or len(only_b):
        examples = "; ".join(f"only in {n}: {len(o)} (e.g. {o[0]})" for o, n in ((only_a, name_a), (only_b, name_b)) if len(o))
        raise RetrievalError(
            f"{name_a} and {name_b} did not evaluate the same queries ({len(a)} and {len(b)} queries; {examples}): "
            "a paired comparison needs both evaluated on the same query images"
        )
    order_a, order_b = np.argsort(a.image_paths), np.argsort(b.image_paths)
    classes_a, classes_b = a.classes[order_a], b.classes[order_b]
    differ = np.flatnonzero(classes_a != classes_b)
    if len(differ):
        path = a.image_paths[order_a][differ[0]]
        raise RetrievalError(f"{name_a} and {name_b} give {len(differ)} queries different classes (e.g. {path}: "
                              f"{str(classes_a[differ[0]])!r} vs {str(classes_b[differ[0]])!r})")
    shared = [name for name in a.metrics if name in b.metrics]
    if not shared:
        raise RetrievalError(f"{name_a} ({', '.join(a.metrics)}) and {name_b} ({', '.join(b.metrics)}) have no metric in common")
    paths = a.image_paths[order_a]
    return (QueryResults(paths, classes_a, {m: a.metrics[m][order_a] for m in shared}),
            QueryResults(paths, classes_b, {m: b.metrics[m][order_b] for m in shared}))


def compare(
    a: QueryResults, b: QueryResults, resamples: int, seed: int = 0, name_a: str = "a", name_b: str = "b",
    confidence: float = CONFIDENCE,
) -> Comparison:
    """Paired-bootstrap intervals of a - b, micro, class-balanced and per class."""
    a, b = pair_queries(a, b, name_a, name_b)
    differences = QueryResults(a.image_paths, a.classes, {m: a.metrics[m] - b.metrics[m] for m in a.metrics})
    return Comparison(
        name_a=name_a,
        name_b=name_b,
        differences=bootstrap(differences, resamples, seed, confidence),
        a=point_estimates(a),
        b=point_estimates(b),
        per_class_a=per_class_values(a),
        per_class_b=per_class_values(b),
        num_queries=len(a),
    )


def point_estimates(results: QueryResults) -> dict[str, dict[str, float]]:
    """Micro and class-balanced value of each metric."""
    return {
        "micro": {m: float(v.mean()) for m, v in results.metrics.items()},
        "class_balanced": {m: class_balanced_mean(v, results.classes) for m, v in results.metrics.items()},
    }


def per_class_values(results: QueryResults) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for metric, values in results.metrics.items():
        names, means = class_means(values, results.classes)
        for name, mean in zip(names, means):
            table.setdefault(str(name), {})[metric] = float(mean)
    return table


def load_query_results(path: str | Path) -> QueryResults:
    """The per-query results stored in an evaluation's JSON (``EvaluationReport.to_dict``)."""
    path = Path(path)
    return query_results_from_dict(read_json(path, RetrievalError), str(path))


def query_results_from_dict(data: Any, source: str) -> QueryResults:
    """:func:`load_query_results` of an evaluation's JSON already read from ``source``."""
    if not isinstance(data, dict) or "top_k_accuracy" not in data:
        raise RetrievalError(f"{source}: not an evaluation written by `vitp evaluate` (no 'top_k_accuracy' key)")
    if data.get("per_query") is None:
        raise RetrievalError(f"{source}: the evaluation holds no per-query results (written by an older vitp?); "
                              "evaluate again to compare it")
    return QueryResults.from_dict(data["per_query"], source)
