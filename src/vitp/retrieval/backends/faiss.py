"""The FAISS backend: an index directory holding a FAISS index of the gallery.

* ``index.faiss``  the FAISS index, inner product on L2-normalised vectors (cosine similarity). PCA /
  whitening, when asked for, is inside it: an ``IndexPreTransform`` whose chain is FAISS's
  ``PCAMatrix`` (``eigen_power=-0.5`` whitens) and an L2 normalisation;
* ``items.npz``    ``image_paths`` and ``labels`` of the gallery, row ``i`` = FAISS id ``i``;
* ``vectors.npy``  the exact gallery vectors (in the index's space), only when the index cannot give
  them back (PQ, SQ, ...) and they do not come from an embedding store; query expansion and
  full-ranking mAP need them. An index built from an embedding store reads them from the store.
* ``meta.json``    see :mod:`vitp.retrieval.index`.

Building (:meth:`FaissIndex.build`) reads the gallery in chunks - from memory (an ``.npz``) or from an
embedding store on disk - trains on a sample, and adds chunk by chunk. With a memory budget the index
type is chosen by autofaiss's rule (:mod:`vitp.retrieval.backends.autoindex`), its search parameter
tuned to a query-time target, and recall@K against exact search is measured on held-out vectors.

Exact search is FAISS's own flat search (blocked, so memory stays bounded), on all GPUs when present.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator

import faiss
import numpy as np
from vitp.progress import progress

import vitp
from vitp.errors import ConfigError, RetrievalError
from vitp.options import FAISS_DEVICES
from vitp.retrieval.backends import autoindex
from vitp.retrieval.feature_file import FeatureSet, check_compatible, replace_directory, write_npz
from vitp.retrieval.index import (
    INDEX_FORMAT,
    INDEX_VERSION,
    RetrievalIndex,
    building_directory,
    check_index_output,
    check_search_parameters,
    drop_excluded,
    gather_chunk_rows,
    source_path,
    write_meta,
)
from vitp.retrieval.rerank import l2_normalise, weighted_expansion

logger = logging.getLogger("vitp")

# Vectors read, transformed and added per step when no memory budget says otherwise.
_CHUNK_ROWS = 65536
# Queries per FAISS call: bounds the (queries x k) result arrays.
_SEARCH_CHUNK_ROWS = 16384
# Gallery vectors PCA is learned on when the gallery itself is the fit set (FAISS would subsample to
# 1000 per input dimension anyway).
_PCA_SAMPLE_PER_DIMENSION = 1000
# Held-out gallery vectors that recall@K and the query-time tuning are measured on.
_HELD_OUT_QUERIES = 1000
RECALL_K = 10


# --------------------------------------------------------------------------------------------------
# FAISS helpers


def gpu_count() -> int:
    """GPUs usable by this FAISS build (0 for faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def to_search_device(index: faiss.Index, faiss_device: str) -> faiss.Index:
    """The index on all visible GPUs when asked (``gpu``) or available (``auto``); CPU otherwise.

    Some index types (HNSW, for one) have no GPU implementation; they stay on the CPU with a note.
    """
    if faiss_device not in FAISS_DEVICES:
        raise ValueError(f"faiss_device {faiss_device!r}: expected one of {', '.join(FAISS_DEVICES)}")
    if faiss_device == "cpu":
        return index
    if gpu_count() == 0:
        if faiss_device == "gpu":
            raise ConfigError(
                "faiss_device gpu: this FAISS has no GPU support or sees no GPU (faiss-cpu is installed; "
                "install faiss-gpu for GPU search)"
            )
        return index
    try:
        return faiss.index_cpu_to_all_gpus(index)
    except RuntimeError as err:
        logger.info("FAISS index stays on the CPU (no GPU version: %s)", str(err).splitlines()[-1])
        return index


def to_cpu(index: faiss.Index) -> faiss.Index:
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        return faiss.index_gpu_to_cpu(index)
    return index


def set_search_parameters(index: faiss.Index, parameters: dict[str, Any]) -> None:
    """``nprobe`` (IVF), ``efSearch`` (HNSW), ... through FAISS's parameter space."""
    if not parameters:
        return
    check_search_parameters(parameters)
    is_gpu = "Gpu" in type(index).__name__
    space = faiss.GpuParameterSpace() if is_gpu else faiss.ParameterSpace()
    for name, value in parameters.items():
        try:
            space.set_index_parameter(index, name, value)
        except RuntimeError as err:
            raise RetrievalError(
                f"search parameter {name}={value} does not apply to this index "
                f"({type(index).__name__}): {str(err).splitlines()[-1]}"
            ) from None


def make_faiss_index(dimension: int, factory: str) -> faiss.Index:
    try:
        return faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise RetrievalError(
            f"factory {factory!r}: FAISS cannot build it ({_faiss_reason(err)}); examples: 'Flat' (exact), "
            f"'IVF1024,Flat', 'HNSW32', 'IVF4096,PQ64', 'OPQ64_128,IVF4096,PQ64x8'"
        ) from None


def _faiss_reason(err: RuntimeError) -> str:
    """FAISS errors start with a C++ signature; the reason is after it."""
    text = str(err).strip().splitlines()[-1]
    for marker in ("Error: ", ": "):
        if marker in text:
            return text.rsplit(marker, 1)[-1].strip()
    return text


def chain_transforms(index: faiss.Index) -> list[faiss.VectorTransform]:
    """The transforms an IndexPreTransform applies before its inner index (none for other indexes)."""
    if not isinstance(index, faiss.IndexPreTransform):
        return []
    return [faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size())]


def _flat_storage(index: faiss.Index) -> np.ndarray | None:
    """A zero-copy view of an IndexFlat's vectors, or None for other index types."""
    if isinstance(index, faiss.IndexFlat) and index.ntotal:
        return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
    return None


def search_excluding(
    index: faiss.Index, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) for each query, in chunks of queries; ``exclude[i]`` never appears in row i
    (see :func:`vitp.retrieval.index.drop_excluded`)."""
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    extra = 0 if exclude is None else 1
    for start in range(0, len(queries), _SEARCH_CHUNK_ROWS):
        stop = min(start + _SEARCH_CHUNK_ROWS, len(queries))
        chunk_scores, chunk_ids = index.search(np.ascontiguousarray(queries[start:stop], dtype=np.float32), k + extra)
        scores[start:stop], ids[start:stop] = drop_excluded(
            chunk_scores, chunk_ids, None if exclude is None else exclude[start:stop], k
        )
    return scores, ids


# --------------------------------------------------------------------------------------------------
# The gallery in the index's space


class Space:
    """Gallery vectors as the index sees them: read from the gallery (memory or store), passed through
    the PCA / whitening chain (if any), L2-normalised."""

    def __init__(self, gallery, transforms: list[faiss.VectorTransform]):
        self.gallery = gallery
        self.transforms = transforms

    @property
    def dimension(self) -> int:
        return self.transforms[-1].d_out if self.transforms else self.gallery.dimension

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Gallery readers give L2-normalised vectors already: without PCA they go in as they are."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        for transform in self.transforms:
            vectors = transform.apply(vectors)
        return vectors

    def take(self, ids: np.ndarray) -> np.ndarray:
        return self.apply(self.gallery.take(ids))

    def chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start, chunk in self.gallery.chunks(rows):
            yield start, self.apply(chunk)


def fit_pca(vectors: np.ndarray, dimensions: int, whiten: bool, source: str) -> list[faiss.VectorTransform]:
    """FAISS's PCA (whitened: components divided by the square root of their eigenvalue), then L2
    normalisation: the transform chain an IndexPreTransform applies to the gallery and to queries."""
    count, input_dimension = vectors.shape
    if not 1 <= dimensions <= input_dimension:
        raise RetrievalError(f"pca {dimensions}: must be between 1 and the feature dimension {input_dimension}")
    if dimensions > count - 1:
        raise RetrievalError(
            f"pca {dimensions}: {source} has {count} vectors, which span at most {count - 1} dimensions "
            f"around their mean; fit PCA on more vectors (pca_fit) or use fewer dimensions"
        )
    pca = faiss.PCAMatrix(input_dimension, dimensions, -0.5 if whiten else 0.0)
    pca.train(np.ascontiguousarray(vectors, dtype=np.float32))
    eigenvalues = faiss.vector_to_array(pca.eigenvalues)[:dimensions]
    # The features are float32: variances below this are rounding noise, and whitening would blow them up.
    noise_floor = eigenvalues[0] * input_dimension * np.finfo(np.float32).eps
    usable = int((eigenvalues > noise_floor).sum())
    if whiten and usable < dimensions:
        raise RetrievalError(
            f"pca {dimensions} with whitening: only {usable} directions of {source} have non-negligible variance; "
            f"whitening the others would amplify noise. Use at most {usable} PCA dimensions"
        )
    return [pca, faiss.NormalizationTransform(dimensions, 2.0)]


def _sample_ids(count: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct row numbers of ``count``, sorted (so that a store reads them shard by shard)."""
    if size >= count:
        return np.arange(count, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(count, size=size, replace=False)).astype(np.int64)


def _held_out_ids(count: int, train_ids: np.ndarray | None) -> np.ndarray:
    """Up to :data:`_HELD_OUT_QUERIES` sorted gallery rows that were not in the training sample (drawn
    without listing all rows: a billion-row gallery must not cost a billion-entry array)."""
    trained = 0 if train_ids is None else len(train_ids)
    drawn = np.random.default_rng(3).choice(count, size=min(count, _HELD_OUT_QUERIES + trained), replace=False)
    if train_ids is not None:
        drawn = drawn[~np.isin(drawn, train_ids)]
    return np.sort(drawn[:_HELD_OUT_QUERIES]).astype(np.int64)


def _chunk_rows(dimension: int, budget: int | None) -> int:
    """Rows read and added at a time: 1/16 of the budget (a chunk is copied a few times on its way in)."""
    if budget is None:
        return _CHUNK_ROWS
    return int(max(256, min(_CHUNK_ROWS, budget // 16 // (4 * dimension))))


# --------------------------------------------------------------------------------------------------
# The index


class FaissIndex(RetrievalIndex):
    """A FAISS index of a gallery, with paths, labels, settings and post-processing."""

    backend = "faiss"

    def __init__(
        self,
        index: faiss.Index,
        image_paths: np.ndarray,
        labels: np.ndarray,
        meta: dict[str, Any],
        vectors: np.ndarray | None = None,
        faiss_device: str = "auto",
        vector_source: Callable[[np.ndarray], np.ndarray] | None = None,
    ):
        super().__init__(image_paths, labels, meta)
        self.full_index = index  # with its PCA chain, as saved
        self.transforms: list[faiss.VectorTransform] = []
        inner = index
        if meta.get("pca") and isinstance(index, faiss.IndexPreTransform):
            # vitp's PCA chain wraps the index of the factory string (which may have a chain of its own, OPQ)
            self.transforms = chain_transforms(index)
            inner = faiss.downcast_index(index.index)
        self.cpu_index = inner
        self.index = to_search_device(inner, faiss_device)
        # Exact gallery vectors: given, or viewed in a flat index's storage, or read (and transformed)
        # from the embedding store by ``vector_source``; otherwise reconstructed by FAISS.
        self._vectors = vectors if vectors is not None else _flat_storage(inner)
        self._vector_source = vector_source
        set_search_parameters(self.index, meta.get("search_parameters") or {})

    def __len__(self) -> int:
        return int(self.cpu_index.ntotal)

    @property
    def dimension(self) -> int:
        return int(self.cpu_index.d)

    # ---------------------------------------------------------------------------------------------
    # Building

    @classmethod
    def build(
        cls,
        gallery,
        factory: str = "Flat",
        *,
        pca_dimensions: int | None = None,
        whiten: bool = False,
        pca_fit=None,
        dba_k: int = 0,
        dba_alpha: float = 0.0,
        search_parameters: dict[str, Any] | None = None,
        faiss_device: str = "auto",
        progress_bar: bool = True,
        max_index_memory: int | None = None,
        max_query_ms: float | None = None,
        measure_recall: bool = False,
    ) -> "FaissIndex":
        """Index ``gallery`` (a FeatureSet, or an embedding store read in chunks).

        PCA / whitening is learned (on ``pca_fit`` or a sample of the gallery) into the index; the index
        type is ``factory``, or, with ``max_index_memory`` (bytes), autofaiss's choice for that budget;
        it is trained on a sample and filled chunk by chunk. DBA replaces each gallery vector by the
        weighted sum of itself and its ``dba_k`` nearest gallery neighbours. ``max_query_ms`` (default
        10 with a budget) tunes nprobe / efSearch; recall@10 against exact search on held-out gallery
        vectors is measured then, or when ``measure_recall`` asks, and recorded in ``meta["tuning"]``."""
        if dba_k < 0:
            raise ValueError(f"dba_k {dba_k}: database-side augmentation takes a number of neighbours >= 0 (0 = off)")
        if whiten and pca_dimensions is None:
            raise RetrievalError("whiten needs pca, a number of dimensions (whitening is applied to the PCA components)")
        if max_index_memory is not None:
            if max_index_memory <= 0:
                raise ValueError(f"max_index_memory must be a positive number of bytes, got {max_index_memory}")
            if factory != "Flat":
                raise ValueError("give either a FAISS factory string or a memory budget, not both: with a "
                                 "budget the index type is chosen to fit it")
        if max_query_ms is not None and max_query_ms <= 0:
            raise ValueError(f"max_query_ms must be > 0, got {max_query_ms}")
        started = time.perf_counter()

        transforms, fit_ids = [], None
        if pca_dimensions is not None:  # 0 is refused by the fit, not taken as "no PCA"
            if pca_fit is not None:
                check_compatible(gallery.settings, pca_fit.settings, f"gallery {gallery.source}", f"pca_fit {pca_fit.source}")
                fit_vectors, fit_source = pca_fit.features, pca_fit.source
            else:
                fit_ids = _sample_ids(len(gallery), _PCA_SAMPLE_PER_DIMENSION * gallery.dimension, seed=1)
                fit_vectors, fit_source = gallery.take(fit_ids), gallery.source
            transforms = fit_pca(fit_vectors, pca_dimensions, whiten, fit_source)
            del fit_vectors
        space = Space(gallery, transforms)

        choice = None
        if max_index_memory is not None:
            try:
                choice = autoindex.choose_index(len(gallery), space.dimension, max_index_memory)
            except ValueError as err:
                raise RetrievalError(f"memory budget {autoindex.human_bytes(max_index_memory)}: {err}") from None
            factory = choice.factory
            logger.info("index for %d x %d vectors within %s: %s (%s; about %s)", len(gallery), space.dimension,
                        autoindex.human_bytes(max_index_memory), factory, choice.reason,
                        autoindex.human_bytes(choice.estimated_bytes))
            if max_query_ms is None:
                max_query_ms = autoindex.DEFAULT_MAX_QUERY_MS
        chunk_rows = _chunk_rows(space.dimension, max_index_memory)
        inner = make_faiss_index(space.dimension, factory)
        _train_faster(inner, opq_iterations=autoindex.OPQ_ITERATIONS if choice else None)
        train_ids = None
        if not inner.is_trained:
            train_rows = choice.train_rows if choice else _training_rows(factory, len(gallery))
            train_ids = _sample_ids(len(gallery), train_rows, seed=2)
            inner = _train(inner, space.take(train_ids), factory, faiss_device)
        if choice is not None:
            _reserve_inverted_lists(inner, space.chunks(chunk_rows))
        inner = _add_all(inner, space.chunks(chunk_rows), len(gallery), factory, faiss_device, progress_bar)

        vectors = None
        if dba_k:
            vectors = _database_side_augmentation(inner, space, dba_k, dba_alpha, faiss_device, chunk_rows)
            inner.reset()  # keeps the training (IVF centroids, PQ codebooks); only the vectors change
            augmented = ((start, vectors[start : start + chunk_rows]) for start in range(0, len(vectors), chunk_rows))
            inner = _add_all(inner, augmented, len(gallery), factory, faiss_device, progress_bar)

        exact = _reconstructs_exactly(inner, space, vectors)
        vector_source = None
        if not exact and vectors is None:
            if isinstance(gallery, FeatureSet):
                vectors = np.ascontiguousarray(space.take(np.arange(len(gallery))), dtype=np.float32)
            else:
                vector_source = space.take  # the store is on disk already: read from it, not copied
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "vitp_version": vitp.__version__,
            "backend": "faiss",
            "factory": factory,
            "metric": "inner_product",
            "count": int(inner.ntotal),
            "dimension": int(inner.d),
            "feature_dimension": gallery.dimension,
            "features_file": source_path(gallery),
            "feature_settings": gallery.settings,
            "pca": None if not transforms else {
                "dimensions": pca_dimensions,
                "whiten": whiten,
                "fitted_on": source_path(pca_fit or gallery),
                "fit_count": len(fit_ids) if pca_fit is None else len(pca_fit),
            },
            "dba": {"k": dba_k, "alpha": dba_alpha} if dba_k else None,
            "search_parameters": search_parameters or {},
            # Exact vectors kept beside a lossy index (vectors.npy), or read from the embedding store.
            "stores_vectors": not exact and vector_source is None,
            "vectors_store": source_path(gallery) if vector_source is not None else None,
            "memory_budget": max_index_memory,
        }
        built = cls(_with_transforms(inner, transforms), *_items(gallery), meta, None if exact else vectors,
                    faiss_device, vector_source)
        built.name = f"the index of {gallery.source}"
        if max_query_ms is not None or measure_recall:
            built._tune_and_measure(space, train_ids, max_query_ms)
        built.meta["build_seconds"] = round(time.perf_counter() - started, 3)
        return built

    def _tune_and_measure(self, space: Space, train_ids: np.ndarray | None, max_query_ms: float | None) -> None:
        """nprobe / efSearch to the query-time target; recall@10 against exact search on held-out vectors."""
        count = len(self)
        held_out = _held_out_ids(count, train_ids if train_ids is not None and len(train_ids) < count else None)
        queries = space.take(held_out)
        tuning: dict[str, Any] = {"held_out_queries": len(held_out)}
        lists = getattr(faiss.try_extract_index_ivf(self.cpu_index), "nlist", 0)
        tunable = autoindex.tunable_parameter(self.meta["factory"], lists)

        def search(batch: np.ndarray) -> object:  # what a served query costs
            return self.index.search(batch, RECALL_K)

        if max_query_ms is not None and tunable is not None:
            def measure(parameters: dict[str, int]) -> float:
                set_search_parameters(self.index, parameters)
                return autoindex.time_per_query_ms(search, queries)

            parameters, _ = autoindex.tune_search(measure, tunable, max_query_ms)
            self.meta["search_parameters"] = {**parameters, **self.meta["search_parameters"]}  # given ones win
            set_search_parameters(self.index, self.meta["search_parameters"])
            tuning.update(max_query_ms=max_query_ms, tuned=tunable.name)
        tuning["ms_per_query"] = round(autoindex.time_per_query_ms(search, queries), 4)
        k = min(RECALL_K, count - 1)
        if k >= 1:
            _, approximate = self.top_k(queries, k, exclude=held_out)
            exact = exact_top_k(space, queries, k, held_out, _chunk_rows(space.dimension, self.meta.get("memory_budget")))
            tuning[f"recall_at_{k}"] = round(autoindex.recall_at_k(approximate, exact), 4)
        self.meta["tuning"] = tuning

    # ---------------------------------------------------------------------------------------------
    # Saving and loading

    def save(self, directory: Path | str) -> Path:
        """Write the index directory atomically: built beside it, then renamed into place."""
        directory = Path(directory)
        check_index_output(directory)
        building = building_directory(directory)
        try:
            faiss.write_index(self.full_index, str(building / "index.faiss"))
            write_npz({"image_paths": self.image_paths, "labels": self.labels}, building / "items.npz")
            if self.meta.get("stores_vectors"):
                _write_npy_in_chunks(self._vectors, building / "vectors.npy")
            write_meta(building, self.meta)
            replace_directory(building, directory)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        self.meta["path"] = self.name = str(directory)
        return directory

    @classmethod
    def load(cls, directory: Path, meta: dict[str, Any], faiss_device: str = "auto") -> "FaissIndex":
        if meta.get("version") == 1 and meta.get("pca"):
            raise RetrievalError(
                f"{directory} was built by an older vitp that kept its PCA in a separate pca.npz; PCA is now part of "
                f"the FAISS index: build it again with `vitp index build`"
            )
        try:
            index = faiss.read_index(str(directory / "index.faiss"))
        except RuntimeError as err:
            raise RetrievalError(f"{directory / 'index.faiss'}: unreadable FAISS index ({_faiss_reason(err)})") from None
        try:
            with np.load(directory / "items.npz", allow_pickle=False) as items:
                image_paths, labels = items["image_paths"].astype(str), items["labels"].astype(str)
            vectors = np.load(directory / "vectors.npy", mmap_mode="r") if meta.get("stores_vectors") else None
        except (OSError, ValueError, KeyError) as err:
            raise RetrievalError(f"{directory}: damaged index directory ({err})") from None
        if not len(image_paths) == len(labels) == index.ntotal:
            raise RetrievalError(
                f"{directory}: items.npz lists {len(image_paths)} images but index.faiss holds {index.ntotal} vectors"
            )
        if meta["feature_dimension"] != index.d:
            raise RetrievalError(
                f"damaged index {directory}: meta.json says {meta['feature_dimension']}-dimensional features, but "
                f"the index (and its PCA) take {index.d}"
            )
        source = _store_vector_source(meta["vectors_store"], index, meta.get("pca")) if meta.get("vectors_store") else None
        return cls(index, image_paths, labels, meta, vectors, faiss_device, source)

    # ---------------------------------------------------------------------------------------------
    # Searching

    def set_search_parameters(self, parameters: dict[str, Any]) -> None:
        set_search_parameters(self.index, parameters)

    def prepare_queries(self, features: np.ndarray) -> np.ndarray:
        """Queries in the index's space: the gallery's PCA / whitening applied, L2-normalised."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        for transform in self.transforms:
            features = transform.apply(features)
        return features if self.transforms else l2_normalise(features)

    def top_k(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return search_excluding(self.index, queries, k, exclude)

    def vectors_by_id(self, ids: np.ndarray) -> np.ndarray:
        if self._vectors is not None:
            return np.asarray(self._vectors[ids], dtype=np.float32)
        if self._vector_source is not None:
            return self._vector_source(ids)
        _enable_reconstruction(self.cpu_index)
        return self.cpu_index.reconstruct_batch(ids)

    def all_gallery_vectors(self) -> np.ndarray:
        """Every gallery vector, exactly (for full-ranking metrics): in memory, N x d float32."""
        if self._vectors is None:
            if self._vector_source is not None:
                _check_fits_in_memory(len(self) * self.dimension * 4, self.meta.get("vectors_store"))
                self._vectors = self._vector_source(np.arange(len(self)))
            else:
                _enable_reconstruction(self.cpu_index)
                self._vectors = self.cpu_index.reconstruct_n(0, len(self))
        return self._vectors

    def describe(self) -> str:
        parts = [f"{self.meta['factory']} index of {len(self)} x {self.dimension}"]
        if self.meta.get("pca"):
            pca = self.meta["pca"]
            parts.append(f"PCA {self.meta['feature_dimension']}->{pca['dimensions']}" + (" + whitening" if pca["whiten"] else ""))
        if self.meta.get("dba"):
            parts.append(f"DBA k={self.meta['dba']['k']} alpha={self.meta['dba']['alpha']}")
        if self.meta.get("search_parameters"):
            parts.append(" ".join(f"{name}={value}" for name, value in self.meta["search_parameters"].items()))
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------------
# Building steps


def _training_rows(factory: str, count: int) -> int:
    """Training sample for a factory string given by hand: as many vectors as FAISS's k-means would use
    (256 per IVF list), enough for PQ codebooks, at most the gallery."""
    lists = max((int(n) for n in re.findall(r"IVF(\d+)", factory)), default=0)
    return min(count, max(256 * lists, 256 * 256))


def _items(gallery) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(gallery.image_paths, dtype=str), np.asarray(gallery.labels, dtype=str)


def _with_transforms(index: faiss.Index, transforms: list[faiss.VectorTransform]) -> faiss.Index:
    if not transforms:
        return index
    wrapped = faiss.IndexPreTransform(index)  # FAISS's Python wrapper keeps references to index and chain
    for transform in reversed(transforms):
        wrapped.prepend_transform(transform)
    return wrapped


def _train_faster(index: faiss.Index, opq_iterations: int | None) -> None:
    """No polysemous code training (it only reorders PQ centroids for Hamming-threshold search, which
    vitp never uses: same results, much less time); fewer OPQ rounds, on fewer vectors, when asked."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and isinstance(faiss.downcast_index(ivf), faiss.IndexIVFPQ):
        faiss.downcast_index(ivf).do_polysemous_training = False
    if opq_iterations is not None:
        for transform in chain_transforms(index):
            if isinstance(transform, faiss.OPQMatrix):
                transform.niter = opq_iterations
                transform.max_train_points = autoindex.PQ_TRAIN_ROWS  # the rotation needs no more than a codebook


def _train(index: faiss.Index, vectors: np.ndarray, factory: str, faiss_device: str) -> faiss.Index:
    """Train (IVF centroids, OPQ rotation, PQ codebooks) on the GPU when one is available."""
    device_index = to_search_device(index, faiss_device)
    try:
        device_index.train(np.ascontiguousarray(vectors, dtype=np.float32))
    except RuntimeError as err:
        raise RetrievalError(
            f"factory {factory!r}: training failed on {len(vectors)} gallery vectors: {_faiss_reason(err)} "
            f"(k-means needs at least as many training vectors as centroids: IVFn needs n, a PQ codebook 256; "
            f"about sqrt(N) IVF lists is the usual choice)"
        ) from None
    return to_cpu(device_index)


def _add_all(index: faiss.Index, chunks, total: int, factory: str, faiss_device: str, progress_bar: bool) -> faiss.Index:
    """Add every chunk, in order (FAISS numbers them 0..N-1), on the GPU when available; returns a CPU index."""
    device_index = to_search_device(index, faiss_device)
    with progress(total=total, unit="vec", desc="index", show=progress_bar and total > _CHUNK_ROWS) as bar:
        for _, chunk in chunks:
            try:
                device_index.add(np.ascontiguousarray(chunk, dtype=np.float32))
            except RuntimeError as err:
                raise RetrievalError(
                    f"factory {factory!r}: FAISS cannot add the gallery vectors to this index ({_faiss_reason(err)}); "
                    f"vitp numbers the gallery itself, so use a factory without IDMap, e.g. 'Flat', 'IVF1024,Flat', 'HNSW32'"
                ) from None
            bar.update(len(chunk))
    return to_cpu(device_index)


def _reserve_inverted_lists(index: faiss.Index, chunks) -> None:
    """Give each inverted list of an IVF index room for exactly the vectors it will receive, counted in
    a first pass over the gallery: lists that grow one add at a time double their capacity, and the
    index would take up to twice its size in memory."""
    ivf = faiss.try_extract_index_ivf(index)
    lists = None if ivf is None else faiss.downcast_InvertedLists(ivf.invlists)
    if not isinstance(lists, faiss.ArrayInvertedLists):
        return
    transforms = chain_transforms(index)  # the factory's own rotation (OPQ) comes before the lists
    quantizer = faiss.downcast_index(ivf.quantizer)
    counts = np.zeros(ivf.nlist, dtype=np.int64)
    for _, chunk in chunks:
        for transform in transforms:
            chunk = transform.apply(chunk)
        _, assigned = quantizer.search(np.ascontiguousarray(chunk, dtype=np.float32), 1)
        counts += np.bincount(assigned.ravel(), minlength=ivf.nlist)
    for number in np.flatnonzero(counts):
        held = lists.list_size(int(number))
        lists.resize(int(number), held + int(counts[number]))  # allocates exactly ...
        lists.resize(int(number), held)  # ... and keeps that capacity for the adds


def _database_side_augmentation(
    index: faiss.Index, space: Space, k: int, alpha: float, faiss_device: str, chunk_rows: int
) -> np.ndarray:
    """Each gallery vector replaced by the weighted sum of itself and its k nearest other gallery vectors.

    The result (N x d) is held in memory for a gallery from an .npz, in a temporary file for a store."""
    count = int(index.ntotal)
    if k >= count:
        raise RetrievalError(f"dba {k}: the gallery has only {count} vectors; use fewer neighbours")
    search_index = to_search_device(index, faiss_device)
    augmented = _scratch_array(count, space.dimension, in_memory=hasattr(space.gallery, "features"))
    step = min(chunk_rows, gather_chunk_rows(k, space.dimension))
    for start, chunk in space.chunks(step):
        own_ids = np.arange(start, start + len(chunk))
        scores, ids = search_excluding(search_index, chunk, k, exclude=own_ids)
        neighbours = np.zeros((*ids.shape, space.dimension), dtype=np.float32)
        valid = ids >= 0
        neighbours[valid] = space.take(ids[valid])
        augmented[start : start + len(chunk)] = weighted_expansion(chunk, neighbours, scores, alpha)
    return augmented


def _scratch_array(rows: int, columns: int, in_memory: bool) -> np.ndarray:
    """A float32 work array, in memory or in a temporary file removed with the array."""
    if in_memory:
        return np.empty((rows, columns), dtype=np.float32)
    directory = tempfile.mkdtemp(prefix="vitp-dba-")
    array = np.lib.format.open_memmap(os.path.join(directory, "vectors.npy"), "w+", np.float32, (rows, columns))
    weakref.finalize(array, shutil.rmtree, directory, True)
    return array


def _enable_reconstruction(index: faiss.Index) -> None:
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
        ivf.make_direct_map()  # IVF indexes can only reconstruct by id with a direct map


def _reconstructs_exactly(index: faiss.Index, space: Space | None, vectors: np.ndarray | None) -> bool:
    """Whether the index gives back the vectors it was given (Flat, HNSW-Flat, IVF-Flat) or only
    approximations (PQ, SQ, ...). Tried on a sample rather than decided from the factory string."""
    count = int(index.ntotal)
    sample = np.unique(np.linspace(0, count - 1, num=min(count, 256)).astype(np.int64))
    ivf = faiss.try_extract_index_ivf(index)
    try:
        _enable_reconstruction(index)
        reconstructed = index.reconstruct_batch(sample)
        expected = vectors[sample] if vectors is not None else space.take(sample)
        exact = bool(np.array_equal(reconstructed, expected))
    except RuntimeError:
        exact = False
    if not exact and ivf is not None:
        ivf.make_direct_map(False)  # an id -> list map (8 bytes a vector) is only worth keeping for exact vectors
    return exact


def exact_top_k(space: Space, queries: np.ndarray, k: int, exclude: np.ndarray | None, chunk_rows: int) -> np.ndarray:
    """Exact top-k ids by inner product over the whole gallery, read chunk by chunk (FAISS's blocked
    search per chunk, results merged in a heap): ground truth that never holds the gallery in memory."""
    heap = faiss.ResultHeap(len(queries), k + (exclude is not None), keep_max=True)
    for start, chunk in space.chunks(chunk_rows):
        depth = min(heap.k, len(chunk))
        scores, ids = faiss.knn(queries, chunk, depth, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(scores, np.where(ids >= 0, ids + start, -1))
    heap.finalize()
    _, ids = drop_excluded(heap.D, heap.I, exclude, k)
    return ids


def _store_vector_source(store_path: str, index: faiss.Index, meta_pca: dict | None) -> Callable[[np.ndarray], np.ndarray]:
    """Exact vectors of a lossy index built from an embedding store: rows of the store, transformed."""
    transforms = chain_transforms(index) if meta_pca else []
    opened: list = []

    def take(ids: np.ndarray) -> np.ndarray:
        if not opened:
            from vitp.retrieval.embedding_store import EmbeddingStore

            try:
                opened.append(Space(EmbeddingStore.open(store_path), transforms))
            except RetrievalError as err:
                raise RetrievalError(
                    f"this index keeps approximate vectors only; its exact vectors (for query expansion and "
                    f"full-ranking mAP) are read from the embedding store it was built from, which cannot be "
                    f"opened: {err}"
                ) from None
            if len(opened[0].gallery) != index.ntotal:
                raise RetrievalError(f"the embedding store {store_path} now holds {len(opened[0].gallery)} vectors, "
                                          f"the index {index.ntotal}: it changed since the index was built")
        return opened[0].take(ids)

    take.keep = index  # the transforms live inside the index
    return take


def _check_fits_in_memory(nbytes: int, where: str | None) -> None:
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if nbytes > available:
        raise RetrievalError(
            f"full-ranking mAP needs every gallery vector in memory ({autoindex.human_bytes(nbytes)} read from "
            f"{where}), more than the {autoindex.human_bytes(available)} available; evaluate without full-ranking mAP"
        )


def _write_npy_in_chunks(array: np.ndarray, path: Path, rows: int = _CHUNK_ROWS) -> None:
    """An .npy written piece by piece, so a memory-mapped array is never read whole into memory."""
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "<f4", "fortran_order": False, "shape": array.shape})
        for start in range(0, len(array), rows):
            handle.write(np.ascontiguousarray(array[start : start + rows], dtype="<f4").tobytes())
