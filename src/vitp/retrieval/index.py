"""A FAISS index of gallery features, saved together with everything needed to use it.

An index is a directory:

* ``index.faiss``  the FAISS index (inner product on L2-normalised vectors = cosine similarity);
* ``meta.json``    format, factory string, sizes, the gallery's feature settings (model fingerprint,
  layer, pooling, image size, ...), the post-processing applied, default search parameters;
* ``items.npz``    ``image_paths`` and ``labels`` of the gallery, row ``i`` = FAISS id ``i``;
* ``pca.npz``      the PCA / whitening applied to the gallery, applied to every query (if any);
* ``vectors.npy``  the exact gallery vectors, only when the FAISS index cannot give them back
  exactly (PQ, SQ, ...); query expansion and full-ranking mAP need them.

Queries are checked against the stored feature settings: features of another model, layer,
pooling or image size are refused (:func:`vitp.retrieval.feature_file.check_compatible`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from tqdm import tqdm

import vitp
from vitp.errors import VitpError
from vitp.retrieval.feature_file import FeatureSet, check_compatible, write_npz
from vitp.retrieval.rerank import PCAWhitening, l2_normalise, weighted_expansion
from vitp.tensor_io import check_parent_folders, make_parent_folder

logger = logging.getLogger("vitp")

INDEX_FORMAT = "vitp-retrieval-index"
INDEX_VERSION = 1
FAISS_DEVICES = ("auto", "cpu", "gpu")
# Vectors added (and gallery rows searched for DBA) per call: bounds temporary memory on big galleries.
_ADD_CHUNK_ROWS = 65536
# Queries per FAISS call: bounds the (queries x k) result arrays.
_SEARCH_CHUNK_ROWS = 16384
# Bytes of neighbour vectors gathered at once for query expansion and DBA (rows x k x d x 4).
_GATHER_BUDGET_BYTES = 128 * 2**20


# Bytes of query x gallery scores held at once by the exact search.
_EXACT_CHUNK_BYTES = 256 * 2**20


def _gather_chunk_rows(k: int, dimension: int) -> int:
    return max(1, _GATHER_BUDGET_BYTES // (4 * max(k, 1) * dimension))


class RetrievalIndexError(VitpError):
    """An index that cannot be built, read or searched as asked."""


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
        raise RetrievalIndexError(f"--faiss_device {faiss_device!r}: expected one of {', '.join(FAISS_DEVICES)}")
    if faiss_device == "cpu":
        return index
    if gpu_count() == 0:
        if faiss_device == "gpu":
            raise RetrievalIndexError(
                "--faiss_device gpu: this FAISS has no GPU support or sees no GPU (faiss-cpu is installed; "
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


# Search parameters that count something (lists visited, candidates kept): below 1, FAISS fails or
# silently returns fewer results. Name -> the flag that sets it, for messages.
_COUNTING_SEARCH_PARAMETERS = {"nprobe": "--nprobe", "efSearch": "--ef_search"}


def check_search_parameters(parameters: dict[str, Any]) -> None:
    """Refuse ``nprobe`` / ``efSearch`` values that are not whole numbers >= 1."""
    for name, value in parameters.items():
        flag = _COUNTING_SEARCH_PARAMETERS.get(name)
        if flag is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise RetrievalIndexError(
                f"{flag} {value!r}: must be a whole number >= 1 (it counts the "
                f"{'inverted lists visited' if name == 'nprobe' else 'candidates kept'} per query)"
            )


def check_query_expansion(qe_k: int) -> None:
    """Refuse a negative number of query-expansion neighbours (0 = off)."""
    if qe_k < 0:
        raise RetrievalIndexError(f"--qe {qe_k}: query expansion takes a number of neighbours >= 0 (0 = off)")


def count_short_results(ids: np.ndarray, expected: int) -> int:
    """Queries whose first ``expected`` results hold a missing one (id -1): an approximate index
    (IVF with a small nprobe, HNSW with a small efSearch) found fewer candidates than asked for."""
    if expected < 1 or ids.size == 0:
        return 0
    return int((ids[:, :expected] < 0).any(axis=1).sum())


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
            raise RetrievalIndexError(
                f"search parameter {name}={value} does not apply to this index "
                f"({type(index).__name__}): {str(err).splitlines()[-1]}"
            ) from None


def make_faiss_index(dimension: int, factory: str) -> faiss.Index:
    try:
        return faiss.index_factory(dimension, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise RetrievalIndexError(
            f"--factory {factory!r}: FAISS cannot build it ({_faiss_reason(err)}); examples: 'Flat' (exact), "
            f"'IVF1024,Flat', 'HNSW32', 'IVF4096,PQ64', 'PCA256,IVF1024,SQ8'"
        ) from None


def _faiss_reason(err: RuntimeError) -> str:
    """FAISS errors start with a C++ signature; the reason is after it."""
    text = str(err).strip().splitlines()[-1]
    for marker in ("Error: ", ": "):
        if marker in text:
            return text.rsplit(marker, 1)[-1].strip()
    return text


def _flat_storage(index: faiss.Index) -> np.ndarray | None:
    """A zero-copy view of an IndexFlat's vectors, or None for other index types."""
    if isinstance(index, faiss.IndexFlat) and index.ntotal:
        return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
    return None


def _reconstructs_exactly(index: faiss.Index, vectors: np.ndarray) -> bool:
    """Whether the index gives back the vectors it was given (Flat, HNSW-Flat, IVF-Flat) or only
    approximations (PQ, SQ, ...). Tried on a sample rather than decided from the factory string."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()  # IVF indexes can only reconstruct by id with a direct map
    sample = np.unique(np.linspace(0, len(vectors) - 1, num=min(len(vectors), 256)).astype(np.int64))
    try:
        reconstructed = index.reconstruct_batch(sample)
    except RuntimeError:
        return False
    return bool(np.array_equal(reconstructed, vectors[sample]))


def search_excluding(
    index: faiss.Index, queries: np.ndarray, k: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (scores, ids) for each query; ``exclude[i]`` (a gallery id, or -1) never appears in row i.

    Searches k + 1 and drops the excluded id where it was found (the last result otherwise), so a
    query is removed by its identity, never by its score: an exact duplicate elsewhere still counts.
    Missing results (a gallery smaller than k) have id -1 and score -inf.
    """
    scores = np.empty((len(queries), k), dtype=np.float32)
    ids = np.empty((len(queries), k), dtype=np.int64)
    extra = 0 if exclude is None else 1
    for start in range(0, len(queries), _SEARCH_CHUNK_ROWS):
        stop = min(start + _SEARCH_CHUNK_ROWS, len(queries))
        chunk_scores, chunk_ids = index.search(np.ascontiguousarray(queries[start:stop]), k + extra)
        if exclude is not None:
            is_self = chunk_ids == exclude[start:stop, None]
            # A stable sort on the mask moves the excluded id (if any) to the end, keeping the order of the rest.
            order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
            chunk_scores = np.take_along_axis(chunk_scores, order, axis=1)
            chunk_ids = np.take_along_axis(chunk_ids, order, axis=1)
        missing = chunk_ids < 0
        chunk_scores[missing] = -np.inf
        scores[start:stop], ids[start:stop] = chunk_scores, chunk_ids
    return scores, ids


def exact_search(
    gallery: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
    chunk_bytes: int = _EXACT_CHUNK_BYTES,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product as blocked matrix products (torch) — the same results as a FAISS
    flat index, but on the CPU it runs at the speed of the machine's GEMM (FAISS's CPU flat search
    reached a fraction of it in benchmarks/search.py). Memory: one block of queries x gallery scores.
    """
    gallery_t = torch.from_numpy(gallery)
    size = len(gallery)
    k_found = min(k, size)
    rows = max(1, chunk_bytes // (4 * size))
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    for start in range(0, len(queries), rows):
        stop = min(start + rows, len(queries))
        block = torch.from_numpy(np.ascontiguousarray(queries[start:stop], dtype=np.float32)) @ gallery_t.T
        if exclude is not None:
            own = torch.from_numpy(exclude[start:stop].astype(np.int64))
            has_own = own >= 0
            block[has_own.nonzero().squeeze(1), own[has_own]] = -torch.inf
        values, indices = torch.topk(block, k_found, dim=1)
        values, indices = values.numpy(), indices.numpy()
        indices[~np.isfinite(values)] = -1  # only the excluded id is -inf: "no result", as FAISS says it
        scores[start:stop, :k_found], ids[start:stop, :k_found] = values, indices
    return scores, ids


# --------------------------------------------------------------------------------------------------
# The index


class RetrievalIndex:
    """A FAISS index of a gallery, with paths, labels, settings and post-processing."""

    def __init__(
        self,
        index: faiss.Index,
        image_paths: np.ndarray,
        labels: np.ndarray,
        meta: dict[str, Any],
        pca: PCAWhitening | None = None,
        vectors: np.ndarray | None = None,
        faiss_device: str = "auto",
    ):
        self.cpu_index = index
        self.index = to_search_device(index, faiss_device)
        self.image_paths = image_paths
        self.labels = labels
        self.meta = meta
        self.name = meta.get("path", "the index")  # for messages: the directory, or the features it was built from
        self.pca = pca
        flat = _flat_storage(index)
        # Exact gallery vectors: given, or viewed in a flat index's storage; None = reconstruct from FAISS.
        self._vectors = vectors if vectors is not None else flat
        # A flat index searched on the CPU goes through exact_search over its own storage.
        self._exact = flat if self.index is index else None
        set_search_parameters(self.index, meta.get("search_parameters") or {})

    def __len__(self) -> int:
        return int(self.cpu_index.ntotal)

    @property
    def dimension(self) -> int:
        return int(self.cpu_index.d)

    @property
    def feature_settings(self) -> dict[str, Any] | None:
        return self.meta.get("feature_settings")

    # ---------------------------------------------------------------------------------------------
    # Building

    @classmethod
    def build(
        cls,
        gallery: FeatureSet,
        factory: str = "Flat",
        *,
        pca_dimensions: int | None = None,
        whiten: bool = False,
        pca_fit: FeatureSet | None = None,
        dba_k: int = 0,
        dba_alpha: float = 0.0,
        search_parameters: dict[str, Any] | None = None,
        faiss_device: str = "auto",
        progress_bar: bool = True,
    ) -> "RetrievalIndex":
        """Post-process the gallery (PCA, DBA), train the index if its type needs it, add the vectors."""
        check_search_parameters(search_parameters or {})  # before the (possibly long) build
        if dba_k < 0:
            raise RetrievalIndexError(f"--dba {dba_k}: database-side augmentation takes a number of neighbours >= 0 (0 = off)")
        vectors = gallery.features
        pca = None
        if pca_dimensions is not None:  # 0 is refused by the fit, not taken as "no PCA"
            fit_set = pca_fit if pca_fit is not None else gallery
            if pca_fit is not None:
                check_compatible(gallery.settings, pca_fit.settings, f"gallery {gallery.source}", f"--pca_fit {pca_fit.source}")
            pca = PCAWhitening.fit(fit_set.features, pca_dimensions, whiten, source=fit_set.source)
            vectors = pca.transform(vectors)
        elif whiten:
            raise RetrievalIndexError("--whiten needs --pca DIMS (whitening is applied to the PCA components)")

        index = make_faiss_index(vectors.shape[1], factory)
        index = _train_and_add(index, vectors, factory, faiss_device, progress_bar)
        if dba_k:
            vectors = _database_side_augmentation(index, vectors, dba_k, dba_alpha, faiss_device)
            index.reset()  # keeps the training (IVF centroids, PQ codebooks); only the vectors change
            index = _train_and_add(index, vectors, factory, faiss_device, progress_bar)

        exact = _reconstructs_exactly(index, vectors)
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "vitp_version": vitp.__version__,
            "factory": factory,
            "metric": "inner_product",
            "count": int(index.ntotal),
            "dimension": int(index.d),
            "feature_dimension": gallery.dimension,
            "features_file": _source_path(gallery),
            "feature_settings": gallery.settings,
            "pca": None if pca is None else {
                "dimensions": pca.output_dimension,
                "whiten": pca.whiten,
                "fitted_on": _source_path(pca_fit or gallery),
                "fit_count": len(pca_fit or gallery),
            },
            "dba": {"k": dba_k, "alpha": dba_alpha} if dba_k else None,
            "search_parameters": search_parameters or {},
            "stores_vectors": not exact,
        }
        stored = None if exact else np.ascontiguousarray(vectors, dtype=np.float32)
        built = cls(index, gallery.image_paths, gallery.labels, meta, pca, stored, faiss_device)
        built.name = f"the index of {gallery.source}"
        return built

    # ---------------------------------------------------------------------------------------------
    # Saving and loading

    def save(self, directory: Path | str) -> Path:
        """Write the index directory atomically: built beside it, then renamed into place."""
        directory = Path(directory)
        make_parent_folder(directory)
        building = directory.with_name(f".{directory.name}.building-{os.getpid()}")
        shutil.rmtree(building, ignore_errors=True)
        building.mkdir()
        try:
            faiss.write_index(to_cpu(self.cpu_index), str(building / "index.faiss"))
            write_npz({"image_paths": self.image_paths, "labels": self.labels}, building / "items.npz")
            if self.pca is not None:
                self.pca.save(building / "pca.npz")
            if self.meta.get("stores_vectors"):
                np.save(building / "vectors.npy", np.asarray(self._vectors, dtype=np.float32))
            meta = {key: value for key, value in self.meta.items() if key != "path"}
            (building / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            _replace_directory(building, directory)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        self.meta["path"] = self.name = str(directory)
        return directory

    @classmethod
    def load(cls, directory: Path | str, faiss_device: str = "auto") -> "RetrievalIndex":
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise RetrievalIndexError(
                f"{directory}: not a vitp index (no meta.json); build one with `vitp index build`"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise RetrievalIndexError(f"{meta_path}: unreadable ({err})") from None
        _check_meta(meta, meta_path)
        try:
            index = faiss.read_index(str(directory / "index.faiss"))
        except RuntimeError as err:
            raise RetrievalIndexError(f"{directory / 'index.faiss'}: unreadable FAISS index ({_faiss_reason(err)})") from None
        try:
            with np.load(directory / "items.npz", allow_pickle=False) as items:
                image_paths, labels = items["image_paths"].astype(str), items["labels"].astype(str)
            pca = PCAWhitening.load(directory / "pca.npz") if meta.get("pca") else None
            vectors = np.load(directory / "vectors.npy", mmap_mode="r") if meta.get("stores_vectors") else None
        except (OSError, ValueError, KeyError) as err:
            raise RetrievalIndexError(f"{directory}: damaged index directory ({err})") from None
        if not len(image_paths) == len(labels) == index.ntotal:
            raise RetrievalIndexError(
                f"{directory}: items.npz lists {len(image_paths)} images but index.faiss holds {index.ntotal} vectors"
            )
        expected_dimension = pca.input_dimension if pca is not None else index.d
        output_dimension = pca.output_dimension if pca is not None else meta["feature_dimension"]
        if meta["feature_dimension"] != expected_dimension or output_dimension != index.d:
            raise RetrievalIndexError(
                f"damaged index {directory}: meta.json says {meta['feature_dimension']}-dimensional features, but "
                f"the index (and its PCA) take {expected_dimension}"
            )
        meta["path"] = str(directory)
        return cls(index, image_paths, labels, meta, pca, vectors, faiss_device)

    # ---------------------------------------------------------------------------------------------
    # Searching

    def check_queries(self, settings: dict[str, Any] | None, dimension: int, name: str) -> None:
        """Refuse query features the gallery's features cannot be compared with."""
        expected = self.meta["feature_dimension"]
        if dimension != expected:
            raise RetrievalIndexError(
                f"{name} has {dimension}-dimensional features; {self.name} was built from {expected}-dimensional "
                f"features (a different model or pooling?)"
            )
        check_compatible(self.feature_settings, settings, self.name, name)

    def prepare_queries(self, features: np.ndarray) -> np.ndarray:
        """Queries in the index's space: the gallery's PCA / whitening applied, L2-normalised."""
        features = np.ascontiguousarray(features, dtype=np.float32)
        return self.pca.transform(features) if self.pca is not None else l2_normalise(features)

    def set_search_parameters(self, parameters: dict[str, Any]) -> None:
        set_search_parameters(self.index, parameters)

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: np.ndarray | None = None,
        qe_k: int = 0,
        qe_alpha: float = 0.0,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k (scores, ids) of prepared queries, with optional query expansion.

        Returns the final query vectors too (expanded, if QE was asked for), for full-ranking metrics.
        """
        check_query_expansion(qe_k)
        k = min(k, len(self))
        scores, ids = self.top_k(queries, max(k, qe_k), exclude)
        if qe_k:
            queries = self.expand(queries, scores[:, :qe_k], ids[:, :qe_k], qe_alpha)
            scores, ids = self.top_k(queries, k, exclude)
        return scores[:, :k], ids[:, :k], queries

    def top_k(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k best gallery vectors; ``exclude[i]`` never appears in row i."""
        if self._exact is not None:
            return exact_search(self._exact, queries, k, exclude)
        return search_excluding(self.index, queries, k, exclude)

    def expand(self, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
        """Query expansion over the top results already found, in chunks of queries."""
        expanded = np.empty_like(queries)
        step = _gather_chunk_rows(ids.shape[1], self.dimension)
        for start in range(0, len(queries), step):
            stop = min(start + step, len(queries))
            neighbours = self.gallery_vectors(ids[start:stop])
            expanded[start:stop] = weighted_expansion(queries[start:stop], neighbours, scores[start:stop], alpha)
        return expanded

    def gallery_vectors(self, ids: np.ndarray) -> np.ndarray:
        """Gallery vectors (in the index's space) for an array of ids; id -1 gives zeros."""
        flat = ids.reshape(-1)
        valid = flat >= 0
        out = np.zeros((len(flat), self.dimension), dtype=np.float32)
        if self._vectors is not None:
            out[valid] = self._vectors[flat[valid]]
        elif valid.any():
            out[valid] = self.cpu_index.reconstruct_batch(flat[valid])
        return out.reshape(*ids.shape, self.dimension)

    def all_gallery_vectors(self) -> np.ndarray:
        """Every gallery vector, exactly (for full-ranking metrics)."""
        if self._vectors is None:
            self._vectors = self.cpu_index.reconstruct_n(0, len(self))
        return self._vectors

    def describe(self) -> str:
        parts = [f"{self.meta['factory']} index of {len(self)} x {self.dimension}"]
        if self.pca is not None:
            parts.append(self.pca.describe())
        if self.meta.get("dba"):
            parts.append(f"DBA k={self.meta['dba']['k']} alpha={self.meta['dba']['alpha']}")
        return ", ".join(parts)


def _train_and_add(index: faiss.Index, vectors: np.ndarray, factory: str, faiss_device: str, progress_bar: bool) -> faiss.Index:
    """Train (IVF centroids, PQ codebooks, ...) if the index type needs it, then add in chunks.

    Works on the GPU when one is available and the index type has a GPU version; returns a CPU index.
    """
    device_index = to_search_device(index, faiss_device)
    if not device_index.is_trained:
        try:
            device_index.train(vectors)
        except RuntimeError as err:
            raise RetrievalIndexError(
                f"--factory {factory!r}: training failed on {len(vectors)} gallery vectors: {_faiss_reason(err)} "
                f"(k-means needs at least as many training vectors as centroids: IVFn needs n, a PQ codebook 256; "
                f"about sqrt(N) IVF lists is the usual choice)"
            ) from None
    with tqdm(total=len(vectors), unit="vec", desc="index", disable=not progress_bar or len(vectors) <= _ADD_CHUNK_ROWS) as bar:
        for start in range(0, len(vectors), _ADD_CHUNK_ROWS):
            chunk = np.ascontiguousarray(vectors[start : start + _ADD_CHUNK_ROWS], dtype=np.float32)
            _add_vectors(device_index, chunk, factory)
            bar.update(len(chunk))
    return to_cpu(device_index)


def _add_vectors(index: faiss.Index, chunk: np.ndarray, factory: str) -> None:
    """``index.add``, with FAISS's refusals (IDMap indexes want ids, ...) as a clear error."""
    try:
        index.add(chunk)
    except RuntimeError as err:
        raise RetrievalIndexError(
            f"--factory {factory!r}: FAISS cannot add the gallery vectors to this index ({_faiss_reason(err)}); "
            f"vitp numbers the gallery itself, so use a factory without IDMap, e.g. 'Flat', 'IVF1024,Flat', 'HNSW32'"
        ) from None


def _database_side_augmentation(
    index: faiss.Index, vectors: np.ndarray, k: int, alpha: float, faiss_device: str
) -> np.ndarray:
    """Each gallery vector replaced by the weighted sum of itself and its k nearest other gallery vectors."""
    if k >= len(vectors):
        raise RetrievalIndexError(f"--dba {k}: the gallery has only {len(vectors)} vectors; use fewer neighbours")
    search_index = to_search_device(index, faiss_device)
    flat = _flat_storage(index) if search_index is index else None
    augmented = np.empty_like(vectors)
    step = _gather_chunk_rows(k, vectors.shape[1])
    for start in range(0, len(vectors), step):
        stop = min(start + step, len(vectors))
        own_ids = np.arange(start, stop)
        if flat is not None:
            scores, ids = exact_search(flat, vectors[start:stop], k, exclude=own_ids)
        else:
            scores, ids = search_excluding(search_index, vectors[start:stop], k, exclude=own_ids)
        neighbours = np.where((ids >= 0)[..., None], vectors[np.maximum(ids, 0)], 0.0).astype(np.float32)
        augmented[start:stop] = weighted_expansion(vectors[start:stop], neighbours, scores, alpha)
    return augmented


# meta.json keys that an index needs, with the JSON types they must have (None: may be null).
_META_FIELDS = {
    "factory": (str,),
    "feature_dimension": (int,),
    "stores_vectors": (bool,),
    "features_file": (str,),
    "feature_settings": (dict, type(None)),
    "pca": (dict, type(None)),
    "dba": (dict, type(None)),
    "search_parameters": (dict, type(None)),
}


def _check_meta(meta: Any, meta_path: Path) -> None:
    """Refuse a meta.json that is not what `vitp index build` writes, naming what is wrong."""
    if not isinstance(meta, dict):
        raise RetrievalIndexError(f"damaged index: {meta_path} holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
        raise RetrievalIndexError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; this vitp reads "
            f"{INDEX_FORMAT!r} version {INDEX_VERSION}"
        )
    missing = [key for key in _META_FIELDS if key not in meta]
    wrong = [
        f"{key} is {type(meta[key]).__name__}"
        for key, types in _META_FIELDS.items()
        if key in meta and (not isinstance(meta[key], types) or (bool not in types and isinstance(meta[key], bool)))
    ]
    dba = meta.get("dba")
    if isinstance(dba, dict) and not (isinstance(dba.get("k"), int) and isinstance(dba.get("alpha"), (int, float))):
        wrong.append("dba lacks a whole k and a number alpha")
    if missing or wrong:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + wrong
        raise RetrievalIndexError(
            f"damaged index: {meta_path}: {'; '.join(problems)}; build the index again with `vitp index build`"
        )


def _source_path(feature_set: FeatureSet) -> str:
    """Where a feature set was read from, as an absolute path (or its description if not from a file)."""
    return os.path.abspath(feature_set.source) if os.path.isfile(feature_set.source) else feature_set.source


def check_index_output(directory: Path | str) -> Path:
    """Refuse, before building, an index directory that could not be written: an existing file or a
    folder that holds something other than a vitp index, or a path under a file."""
    directory = Path(directory)
    if directory.exists():
        if not directory.is_dir() or (any(directory.iterdir()) and not (directory / "meta.json").is_file()):
            raise RetrievalIndexError(f"{directory}: exists and is not a vitp index; not overwriting it")
    check_parent_folders(directory)
    return directory


def _replace_directory(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``; an existing ``target`` is moved aside first and removed after."""
    old = None
    if target.exists():
        check_index_output(target)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
