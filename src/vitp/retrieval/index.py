"""The retrieval index: what `search`, `evaluate` and `serve` talk to, whatever engine holds the vectors.

An index is a directory with a ``meta.json`` (format, backend, the gallery's feature settings with the
model fingerprint, sizes, post-processing, default search parameters); the backend keeps the rest:

* ``faiss``  (:mod:`vitp.retrieval.backends.faiss`): ``index.faiss`` (PCA / whitening inside it),
  ``items.npz`` (paths and labels), optionally exact vectors; on one machine, GPU when present;
* ``milvus`` (:mod:`vitp.retrieval.backends.milvus`): a Milvus collection that holds the vectors,
  paths, labels and the model fingerprint, in Milvus Lite (a local file) or a Milvus cluster.

:class:`RetrievalIndex` is the interface: the gallery's paths and labels, the queries check (features
of another model, layer, pooling or image size are refused), top-k search excluding given ids,
query expansion, and the exact gallery vectors for re-ranking. ``RetrievalIndex.build`` and
``RetrievalIndex.load`` choose the backend.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from vitp.errors import RetrievalError
from vitp.files import check_parent_folders, make_parent_folder, read_json
from vitp.options import BACKENDS
from vitp.retrieval.feature_file import check_compatible
from vitp.retrieval.rerank import weighted_expansion

logger = logging.getLogger("vitp")

INDEX_FORMAT = "vitp-retrieval-index"
INDEX_VERSION = 2  # 2: PCA inside the FAISS index, a backend field; 1 (no backend, pca.npz) is read without PCA
# The Milvus Lite database a Milvus index directory holds by default (also while its build is unfinished).
MILVUS_LITE_FILE = "milvus.db"
# Bytes of neighbour vectors gathered at once for query expansion and DBA (rows x k x d x 4).
_GATHER_BUDGET_BYTES = 128 * 2**20


def gather_chunk_rows(k: int, dimension: int) -> int:
    return max(1, _GATHER_BUDGET_BYTES // (4 * max(k, 1) * dimension))


# --------------------------------------------------------------------------------------------------
# Checks shared by every backend


# Search parameters that count something (lists visited, candidates kept): below 1, FAISS fails or
# silently returns fewer results. Name -> what it counts, for messages.
_COUNTING_SEARCH_PARAMETERS = {"nprobe": "inverted lists visited", "efSearch": "candidates kept"}


def check_search_parameters(parameters: dict[str, Any]) -> None:
    """Refuse ``nprobe`` / ``efSearch`` values that are not whole numbers >= 1."""
    for name, value in parameters.items():
        counted = _COUNTING_SEARCH_PARAMETERS.get(name)
        if counted is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} {value!r}: must be a whole number >= 1 (it counts the {counted} per query)")


def count_short_results(ids: np.ndarray, expected: int) -> int:
    """Queries whose first ``expected`` results hold a missing one (id -1): an approximate index
    (IVF with a small nprobe, HNSW with a small efSearch) found fewer candidates than asked for."""
    if expected < 1 or ids.size == 0:
        return 0
    return int((ids[:, :expected] < 0).any(axis=1).sum())


def drop_excluded(scores: np.ndarray, ids: np.ndarray, exclude: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """From results searched with one extra rank, remove ``exclude[i]`` from row i (the last result if it
    is not there): a query is removed by its identity, never by its score, so an exact duplicate under
    another name still counts. Missing results get id -1 and score -inf."""
    if exclude is not None:
        is_self = ids == exclude[:, None]
        # A stable sort on the mask moves the excluded id (if any) to the end, keeping the order of the rest.
        order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(scores, order, axis=1)
        ids = np.take_along_axis(ids, order, axis=1)
    scores, ids = scores[:, :k].astype(np.float32, copy=True), ids[:, :k].astype(np.int64, copy=True)
    scores[ids < 0] = -np.inf
    return scores, ids


# --------------------------------------------------------------------------------------------------
# The interface


class RetrievalIndex(ABC):
    """A gallery in a vector index, with its paths, labels, feature settings and post-processing.

    A backend implements :meth:`top_k`, :meth:`gallery_vectors`, :meth:`all_gallery_vectors`,
    :meth:`prepare_queries`, :meth:`set_search_parameters`, :meth:`describe` and :meth:`save`."""

    backend = ""

    def __init__(self, image_paths: np.ndarray, labels: np.ndarray, meta: dict[str, Any]):
        self.image_paths = image_paths
        self.labels = labels
        self.meta = meta
        self.name = meta.get("path", "the index")  # for messages: the directory, or the features it was built from

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def dimension(self) -> int:
        """Dimension of the vectors searched (after PCA, if any)."""
        return int(self.meta["dimension"])

    @property
    def feature_settings(self) -> dict[str, Any] | None:
        return self.meta.get("feature_settings")

    # ---------------------------------------------------------------------------------------------
    # Choosing the backend

    @classmethod
    def build(cls, gallery, factory: str = "Flat", *, backend: str = "faiss", **options) -> "RetrievalIndex":
        """An index of ``gallery`` (a :class:`FeatureSet` or an embedding store) in ``backend``; the
        options are those of :meth:`FaissIndex.build <vitp.retrieval.backends.faiss.FaissIndex.build>`
        or :meth:`MilvusIndex.build <vitp.retrieval.backends.milvus.MilvusIndex.build>`."""
        if backend == "faiss":
            from vitp.retrieval.backends.faiss import FaissIndex

            return FaissIndex.build(gallery, factory, **options)
        if backend == "milvus":
            from vitp.retrieval.backends.milvus import MilvusIndex

            if factory != "Flat":
                raise RetrievalError("a FAISS factory string does not apply to a Milvus collection; choose the "
                                          "Milvus index type instead")
            return MilvusIndex.build(gallery, **options)
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")

    @classmethod
    def load(cls, directory: Path | str, faiss_device: str = "auto") -> "RetrievalIndex":
        """The index saved in ``directory``, opened with the backend its meta.json names."""
        directory = Path(directory)
        meta = read_meta(directory)
        if meta.get("backend", "faiss") == "milvus":
            from vitp.retrieval.backends.milvus import MilvusIndex

            return MilvusIndex.load(directory, meta)
        from vitp.retrieval.backends.faiss import FaissIndex

        return FaissIndex.load(directory, meta, faiss_device)

    # ---------------------------------------------------------------------------------------------
    # Searching, the same for every backend

    def check_queries(self, settings: dict[str, Any] | None, dimension: int, name: str) -> None:
        """Refuse query features the gallery's features cannot be compared with."""
        expected = self.meta["feature_dimension"]
        if dimension != expected:
            raise RetrievalError(
                f"{name} has {dimension}-dimensional features; {self.name} was built from {expected}-dimensional "
                f"features (a different model or pooling?)"
            )
        check_compatible(self.feature_settings, settings, self.name, name)

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
        if qe_k < 0:
            raise ValueError(f"qe_k {qe_k}: query expansion takes a number of neighbours >= 0 (0 = off)")
        k = min(k, len(self))
        scores, ids = self.top_k(queries, max(k, qe_k), exclude)
        if qe_k:
            queries = self.expand(queries, scores[:, :qe_k], ids[:, :qe_k], qe_alpha)
            scores, ids = self.top_k(queries, k, exclude)
        return scores[:, :k], ids[:, :k], queries

    def expand(self, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
        """Query expansion over the top results already found, in chunks of queries."""
        expanded = np.empty_like(queries)
        step = gather_chunk_rows(ids.shape[1], self.dimension)
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
        if valid.any():
            out[valid] = self.vectors_by_id(flat[valid])
        return out.reshape(*ids.shape, self.dimension)

    # ---------------------------------------------------------------------------------------------
    # What a backend provides

    @abstractmethod
    def prepare_queries(self, features: np.ndarray) -> np.ndarray:
        """Queries in the index's space (the gallery's post-processing applied), L2-normalised."""

    @abstractmethod
    def top_k(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the k best gallery vectors; ``exclude[i]`` never appears in row i; id -1 and
        score -inf where fewer than k were found."""

    @abstractmethod
    def vectors_by_id(self, ids: np.ndarray) -> np.ndarray:
        """Exact gallery vectors in the index's space, for valid ids."""

    @abstractmethod
    def all_gallery_vectors(self) -> np.ndarray:
        """Every gallery vector, exactly (for full-ranking metrics)."""

    @abstractmethod
    def set_search_parameters(self, parameters: dict[str, Any]) -> None:
        """Apply counting search parameters (``nprobe``, ``efSearch``) to later searches."""

    @abstractmethod
    def describe(self) -> str:
        """One line: engine, index type, size."""

    @abstractmethod
    def save(self, directory: Path | str) -> Path:
        """Write the index directory; returns it."""


# --------------------------------------------------------------------------------------------------
# The index directory


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


def read_meta(directory: Path) -> dict[str, Any]:
    """meta.json of an index directory, checked: what every backend's loader starts from."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        raise RetrievalError(f"{directory}: not a vitp index (no meta.json); build one with `vitp index build`")
    meta = read_json(meta_path, RetrievalError)
    check_meta(meta, meta_path)
    meta["path"] = str(directory)
    return meta


def check_meta(meta: Any, meta_path: Path) -> None:
    """Refuse a meta.json that is not what `vitp index build` writes, naming what is wrong."""
    if not isinstance(meta, dict):
        raise RetrievalError(f"damaged index: {meta_path} holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != INDEX_FORMAT or meta.get("version") not in (1, INDEX_VERSION):
        raise RetrievalError(
            f"{meta_path}: format {meta.get('format')!r} version {meta.get('version')!r}; this vitp reads "
            f"{INDEX_FORMAT!r} versions 1 and {INDEX_VERSION}"
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
    if meta.get("backend", "faiss") not in BACKENDS:
        wrong.append(f"backend {meta.get('backend')!r}")
    if missing or wrong:
        problems = ([f"missing {', '.join(missing)}"] if missing else []) + wrong
        raise RetrievalError(
            f"damaged index: {meta_path}: {'; '.join(problems)}; build the index again with `vitp index build`"
        )


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    meta = {key: value for key, value in meta.items() if key != "path"}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def source_path(gallery) -> str:
    """Where a gallery was read from, as an absolute path (or its description if not from a file)."""
    return os.path.abspath(gallery.source) if os.path.exists(gallery.source) else gallery.source


def check_index_output(directory: Path | str) -> Path:
    """Refuse, before building, an index directory that could not be written: an existing file or a
    folder that holds something other than a vitp index (or an unfinished Milvus Lite build), or a path
    under a file."""
    directory = Path(directory)
    if directory.exists():
        is_index = (directory / "meta.json").is_file() or (directory / MILVUS_LITE_FILE).exists()
        if not directory.is_dir() or (any(directory.iterdir()) and not is_index):
            raise RetrievalError(f"{directory}: exists and is not a vitp index; not overwriting it")
    check_parent_folders(directory)
    return directory


def building_directory(directory: Path) -> Path:
    """A fresh folder beside ``directory`` to write an index into before it replaces ``directory``."""
    make_parent_folder(directory)
    building = directory.with_name(f".{directory.name}.building-{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir()
    return building
