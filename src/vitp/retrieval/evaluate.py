"""``vitp evaluate``: Top-K accuracy (the seed's lines), precision@K, mAP@K, full-ranking mAP and a
per-class table, for query features against a gallery (features or a built index); each Top-K and
mAP also class-balanced (the mean over classes), with bootstrap intervals if asked
(:mod:`vitp.retrieval.statistics`), and per-query values so that two evaluations can be compared.

The gallery goes into a FAISS index (exact inner product unless ``factory`` says otherwise, with
PCA / whitening / DBA if asked), queries are searched in chunks, optional query expansion searches
again, and the metrics are computed from the ranked ids. Full-ranking mAP scores chunks of queries
against the gallery (see :func:`vitp.retrieval.metrics.average_precision`), so memory stays bounded
whatever the sizes.

Leave-one-out: a query is matched to its gallery entry by image path and that entry is removed from
its results (never by score: an exact duplicate under another name still counts). Queries whose
class has no (other) image in the gallery are excluded from every metric and listed.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vitp.errors import RetrievalError
from vitp.retrieval import metrics
from vitp.retrieval.feature_file import FeatureSet
from vitp.retrieval.index import RetrievalIndex, count_short_results
from vitp.retrieval.statistics import Bootstrap, QueryResults, bootstrap, class_balanced_mean

logger = logging.getLogger("vitp")

# How an empty label (an image path without a folder) is shown among the excluded queries.
NO_CLASS = "(no class)"


@dataclass
class EvaluationReport:
    num_queries: int
    num_evaluated: int
    query_shape: tuple[int, int]
    gallery_shape: tuple[int, int]
    top_k: list[int]
    hits: dict[int, int]
    accuracy: dict[int, float]
    precision: dict[int, float]
    map_at_k: dict[int, float]
    mean_average_precision: float | None  # full ranking; None when skipped
    per_class: list[dict[str, Any]]
    excluded: dict[str, int]  # class -> queries without any relevant gallery image
    leave_one_out: bool
    index_description: str
    query_expansion: dict[str, Any] | None
    self_matches: int = 0  # queries that are also in the gallery, without leave_one_out
    notes: list[str] = field(default_factory=list)
    per_query: QueryResults | None = None  # Top-K hits and AP of each evaluated query
    intervals: Bootstrap | None = None  # bootstrap intervals, when asked for

    @property
    def class_balanced(self) -> dict[str, float]:
        """Each per-query metric (Top-K, mAP) as the mean over classes of the per-class mean."""
        if self.per_query is None:
            return {}
        return {name: class_balanced_mean(values, self.per_query.classes) for name, values in self.per_query.metrics.items()}

    def add_intervals(self, resamples: int, seed: int = 0) -> Bootstrap:
        """Bootstrap intervals of the micro, class-balanced and per-class metrics."""
        if self.per_query is None:
            raise ValueError("this report has no per-query results to resample")
        self.intervals = bootstrap(self.per_query, resamples, seed)
        return self.intervals

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_queries": self.num_queries,
            "num_evaluated": self.num_evaluated,
            "query_shape": list(self.query_shape),
            "gallery_shape": list(self.gallery_shape),
            "top_k_accuracy": {f"top{k}": self.accuracy[k] for k in self.top_k},
            "top_k_hits": {f"top{k}": self.hits[k] for k in self.top_k},
            "precision_at_k": {f"P@{k}": self.precision[k] for k in self.top_k},
            "map_at_k": {f"mAP@{k}": self.map_at_k[k] for k in self.top_k},
            "map": self.mean_average_precision,
            "per_class": self.per_class,
            "excluded_queries": {"count": sum(self.excluded.values()), "by_class": self.excluded},
            "leave_one_out": self.leave_one_out,
            "index": self.index_description,
            "query_expansion": self.query_expansion,
            "queries_also_in_gallery": self.self_matches,
            "warnings": self.notes,
            "class_balanced": self.class_balanced,
            "bootstrap": self.intervals.to_dict() if self.intervals else None,
            "per_query": self.per_query.to_dict() if self.per_query else None,
        }

    def summary_lines(self) -> list[str]:
        """The seed's lines (shape line and ``Top-1 准确率: 0.8520 (852/1000)``), each with its English form."""
        (nq, dq), (ng, dg) = self.query_shape, self.gallery_shape
        lines = [f"查询集: ({nq}, {dq}), 候选集: ({ng}, {dg})", f"queries: {nq} x {dq}, gallery: {ng} x {dg} ({self.index_description})"]
        if self.query_expansion:
            qe = self.query_expansion
            lines.append(f"query expansion: top {qe['k']}, alpha {qe['alpha']}")
        if self.leave_one_out:
            lines.append("leave-one-out: each query is removed from its own results")
        for k in self.top_k:
            value, count = self.accuracy[k], self.hits[k]
            lines.append(f"Top-{k} 准确率: {value:.4f} ({count}/{self.num_evaluated})")
            lines.append(f"Top-{k} accuracy: {value:.4f} ({count}/{self.num_evaluated})")
        lines.append("  ".join(f"P@{k}: {self.precision[k]:.4f}" for k in self.top_k))
        lines.append("  ".join(f"mAP@{k}: {self.map_at_k[k]:.4f}" for k in self.top_k))
        if self.mean_average_precision is not None:
            lines.append(f"mAP: {self.mean_average_precision:.4f} (full ranking of the gallery)")
        if self.per_query is not None:
            classes = len(set(self.per_query.classes))
            lines.append(f"class-balanced (mean over {classes} classes): "
                         + "  ".join(f"{name}: {value:.4f}" for name, value in self.class_balanced.items()))
        lines += self.interval_lines()
        if self.excluded:
            shown = ", ".join(f"{name} ({count})" for name, count in sorted(self.excluded.items())[:10])
            more = f", ... ({len(self.excluded) - 10} more classes)" if len(self.excluded) > 10 else ""
            lines.append(
                f"excluded {sum(self.excluded.values())} of {self.num_queries} queries whose class has no "
                f"{'other ' if self.leave_one_out else ''}image in the gallery: {shown}{more}"
            )
        if self.self_matches:
            lines.append(
                f"warning: {self.self_matches} query images are also in the gallery (same path) and will find "
                f"themselves; pass leave_one_out if the query set is (part of) the gallery"
            )
        lines.extend(self.notes)
        return lines

    def interval_lines(self) -> list[str]:
        """A table of micro and class-balanced values with their bootstrap intervals."""
        if self.intervals is None:
            return []
        b = self.intervals
        width = max(6, *(len(name) for name in b.micro))
        lines = [
            f"{b.confidence:.0%} intervals: percentile bootstrap over queries, {b.resamples} resamples, seed {b.seed} "
            "(class-balanced: queries resampled within each class)",
            f"{'metric':<{width}}  {'micro':<26}  class-balanced",
        ]
        for name in b.micro:
            lines.append(f"{name:<{width}}  {b.micro[name].format(4):<26}  {b.class_balanced[name].format(4)}")
        return lines

    def class_table_lines(self) -> list[str]:
        if not self.per_class:
            return []
        width = max(5, *(len(row["class"]) for row in self.per_class))
        ks = self.top_k
        header = f"{'class':<{width}}  {'queries':>7}  " + "  ".join(f"{'Top-' + str(k):>6}" for k in ks)
        map_label = self.ap_metric
        header += f"  {'P@' + str(ks[-1]):>6}  {map_label:>6}"
        if self.intervals is not None:
            header += f"  {map_label + ' ' + format(self.intervals.confidence, '.0%') + ' interval':>20}"
        lines = [header, "-" * len(header)]
        for row in self.per_class:
            line = f"{row['class']:<{width}}  {row['queries']:>7}  " + "  ".join(f"{row['top_k'][f'top{k}']:>6.3f}" for k in ks)
            line += f"  {row['precision'][f'P@{ks[-1]}']:>6.3f}  {row['map']:>6.3f}"
            if self.intervals is not None:
                interval = self.intervals.per_class[row["class"]][map_label]
                line += f"  {f'[{interval.low:.3f}, {interval.high:.3f}]':>20}"
            lines.append(line)
        return lines

    @property
    def ap_metric(self) -> str:
        """The name of the per-query AP metric: full-ranking mAP, else mAP@K for the largest K."""
        return ap_metric_name(self.mean_average_precision is not None, self.top_k)


def ap_metric_name(full_ranking: bool, top_k: list[int]) -> str:
    """What the per-query AP is called: ``mAP`` over the full ranking, else ``mAP@K`` for the largest K."""
    return "mAP" if full_ranking else f"mAP@{top_k[-1]}"


def require_two_classes(labels: np.ndarray, name: str) -> None:
    """Refuse a gallery whose labels cannot tell a right result from a wrong one.

    With one class (or none) every result "has the query's class", so Top-K and mAP come out
    perfect whatever the features are: numbers that look like a result but measure nothing.
    """
    labels = np.asarray(labels).astype(str)
    classes = sorted(set(map(str, labels)) - {""})
    if len(classes) >= 2:
        return
    unlabelled = int((labels == "").sum())
    found = f"only the class {classes[0]!r}" if classes else "no class at all"
    detail = ""
    if unlabelled:
        detail = f"; {unlabelled} of its {len(labels)} images have no class (no parent folder in their path)"
    raise RetrievalError(
        f"{name} has {found}{detail}: with fewer than 2 classes every result counts as a match, so Top-K accuracy "
        f"and mAP would be perfect whatever the features are, and meaningless. The class of an image is the name of "
        f"its folder: put each class's images in a folder of its own (at least 2 classes) and run `vitp features` again"
    )


def self_ids_by_path(query_paths: np.ndarray, gallery_paths: np.ndarray) -> np.ndarray:
    """The gallery id of each query's own image (same path), or -1."""
    position = {str(path): i for i, path in enumerate(gallery_paths)}
    return np.array([position.get(str(path), -1) for path in query_paths], dtype=np.int64)


def evaluate_retrieval(
    queries: FeatureSet | None,
    gallery: FeatureSet | None = None,
    *,
    index: RetrievalIndex | None = None,
    top_k: list[int] = (1, 3, 5),
    leave_one_out: bool = False,
    factory: str = "Flat",
    pca_dimensions: int | None = None,
    whiten: bool = False,
    pca_fit: FeatureSet | None = None,
    dba_k: int = 0,
    dba_alpha: float = 0.0,
    qe_k: int = 0,
    qe_alpha: float = 0.0,
    search_parameters: dict[str, Any] | None = None,
    full_map: bool = True,
    faiss_device: str = "auto",
    progress_bar: bool = True,
    bootstrap_resamples: int = 0,
    seed: int = 0,
) -> EvaluationReport:
    """Search every query in the gallery and compute the metrics (see the module docstring);
    ``bootstrap_resamples`` > 0 adds intervals (:func:`vitp.retrieval.statistics.bootstrap`, ``seed``)."""
    top_k = sorted(set(int(k) for k in top_k))
    if not top_k or top_k[0] < 1:
        raise ValueError(f"top_k values must be >= 1, got {top_k}")

    if index is None:
        if gallery is None:
            raise RetrievalError("give the gallery as gallery_features or index")
        require_two_classes(gallery.labels, f"gallery {gallery.source}")
        index = RetrievalIndex.build(
            gallery, factory, pca_dimensions=pca_dimensions, whiten=whiten, pca_fit=pca_fit, dba_k=dba_k,
            dba_alpha=dba_alpha, search_parameters=search_parameters, faiss_device=faiss_device,
            progress_bar=progress_bar,
        )
    else:
        require_two_classes(index.labels, index.name)
        if pca_dimensions is not None or whiten or dba_k or pca_fit is not None or factory != "Flat":
            raise RetrievalError(
                "factory/pca/whiten/pca_fit/dba shape the gallery's index, so they are set when it is built "
                "(`vitp index build`); with index they come from the index"
            )
        if search_parameters:
            index.set_search_parameters(search_parameters)
    if queries is None:
        if gallery is None:
            raise RetrievalError("give query_features (or leave_one_out with the gallery's features as queries)")
        if not leave_one_out:
            raise RetrievalError("without query_features, the gallery is the query set: pass leave_one_out")
        queries = gallery if isinstance(gallery, FeatureSet) else gallery.load()  # an embedding store: every query in memory
    index.check_queries(queries.settings, queries.dimension, f"query features {queries.source}")

    exclude = self_ids_by_path(queries.image_paths, index.image_paths)
    in_gallery = int((exclude >= 0).sum())
    if leave_one_out and in_gallery == 0:
        raise RetrievalError(
            f"leave_one_out: none of the {len(queries)} query images is in the gallery (matched by path); "
            f"leave-one-out is for a query set that is (part of) the gallery"
        )

    classes, query_classes, gallery_classes = metrics.encode_labels(queries.labels, index.labels)
    relevant = metrics.relevant_counts(query_classes, gallery_classes, len(classes), exclude if leave_one_out else None)
    # An empty label is "no class", not a class: such queries cannot be judged right or wrong.
    labelled = np.char.str_len(queries.labels.astype(str)) > 0
    answerable = (relevant > 0) & labelled
    excluded = Counter(str(classes[c]) or NO_CLASS for c in query_classes[~answerable])
    if not answerable.any():
        raise RetrievalError(_nothing_to_evaluate(queries, index, leave_one_out, labelled))

    selected = np.flatnonzero(answerable)
    query_vectors = index.prepare_queries(queries.features[selected])
    chosen_exclude = exclude[selected] if leave_one_out else None
    k_max = min(top_k[-1], len(index) - (1 if leave_one_out else 0))
    scores, ids, final_queries = index.search(query_vectors, k_max, exclude=chosen_exclude, qe_k=qe_k, qe_alpha=qe_alpha)
    notes = _short_result_notes(ids, k_max, index)
    if k_max < top_k[-1]:  # a gallery smaller than K: missing ranks count as misses
        ids = np.pad(ids, ((0, 0), (0, top_k[-1] - k_max)), constant_values=-1)

    q_classes, q_relevant = query_classes[selected], relevant[selected]
    hits = metrics.hit_matrix(ids, q_classes, gallery_classes)
    per_query = {
        "top": {k: metrics.top_k_hits(hits, k) for k in top_k},
        "precision": {k: metrics.precision_at_k(hits, k) for k in top_k},
        "ap_at": {k: metrics.average_precision_at_k(hits, q_relevant, k) for k in top_k},
    }
    ap = None
    if full_map:
        ap = metrics.average_precision(
            final_queries, index.all_gallery_vectors(), q_classes, gallery_classes, q_relevant, chosen_exclude
        )
    ap_values = ap if ap is not None else per_query["ap_at"][top_k[-1]]
    per_class = _per_class_rows(classes, q_classes, top_k, per_query, ap_values)
    query_results = QueryResults(
        queries.image_paths[selected], classes[q_classes],
        {**{f"Top-{k}": per_query["top"][k] for k in top_k}, ap_metric_name(ap is not None, top_k): ap_values},
    )
    report = EvaluationReport(
        num_queries=len(queries),
        num_evaluated=len(selected),
        query_shape=tuple(queries.features.shape),
        gallery_shape=(len(index), index.meta["feature_dimension"]),
        top_k=top_k,
        hits={k: int(per_query["top"][k].sum()) for k in top_k},
        accuracy={k: float(per_query["top"][k].mean()) for k in top_k},
        precision={k: float(per_query["precision"][k].mean()) for k in top_k},
        map_at_k={k: float(per_query["ap_at"][k].mean()) for k in top_k},
        mean_average_precision=None if ap is None else float(ap.mean()),
        per_class=per_class,
        excluded=dict(sorted(excluded.items())),
        leave_one_out=leave_one_out,
        index_description=index.describe(),
        query_expansion={"k": qe_k, "alpha": qe_alpha} if qe_k else None,
        self_matches=0 if leave_one_out else in_gallery,
        notes=notes,
        per_query=query_results,
    )
    if bootstrap_resamples:
        report.add_intervals(bootstrap_resamples, seed)
    return report


def _nothing_to_evaluate(
    queries: FeatureSet, index: RetrievalIndex, leave_one_out: bool, labelled: np.ndarray
) -> str:
    """Why no query can be evaluated, without contradicting itself: in leave-one-out a class may be
    in the gallery only as the query's own image."""
    query_classes = sorted(set(map(str, queries.labels[labelled])))
    gallery_classes = set(map(str, index.labels))
    if not query_classes:
        return f"none of the {len(queries)} queries has a class (their paths have no folder)"
    only_themselves = [name for name in query_classes if name in gallery_classes]
    if leave_one_out and only_themselves:
        return (
            f"no query can be evaluated: with leave_one_out each query's own image is removed, and in the classes "
            f"of the queries ({', '.join(only_themselves[:10])}) that image is the class's only one in the gallery; "
            f"each class needs at least 2 images"
        )
    return (
        f"none of the {len(queries)} queries has a class present in the gallery (query classes: "
        f"{', '.join(query_classes[:10])}; gallery classes: {', '.join(sorted(gallery_classes)[:10])})"
    )


def _short_result_notes(ids: np.ndarray, expected: int, index: RetrievalIndex) -> list[str]:
    """A warning line when the index returned fewer results than asked for (they count as misses)."""
    short = count_short_results(ids, expected)
    if not short:
        return []
    return [
        f"warning: {short} of {len(ids)} queries got fewer than {expected} results from {index.describe()}; the "
        f"missing ranks count as misses (raise nprobe for an IVF index, ef_search for HNSW)"
    ]


def _per_class_rows(
    classes: np.ndarray, query_classes: np.ndarray, top_k: list[int], per_query: dict, ap_values: np.ndarray
) -> list[dict[str, Any]]:
    """One row per class that has evaluated queries: counts, Top-K, P@K and mAP (full, else mAP@K)."""
    rows = []
    for class_id in np.unique(query_classes):
        mask = query_classes == class_id
        rows.append({
            "class": str(classes[class_id]),
            "queries": int(mask.sum()),
            "top_k": {f"top{k}": float(per_query["top"][k][mask].mean()) for k in top_k},
            "precision": {f"P@{k}": float(per_query["precision"][k][mask].mean()) for k in top_k},
            "map": float(ap_values[mask].mean()),
        })
    return rows
