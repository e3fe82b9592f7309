"""The embedding store: gallery features as a folder of shards, for galleries larger than RAM.

    <store>/store.json                       format, version, feature settings, dtype, dimension, shards
    <store>/embeddings/part-000000.npy       float16 or float32 [rows, D], L2-normalised
    <store>/metadata/part-000000.parquet     image_path, label, size, mtime_ns, row

This is the layout clip-retrieval writes and embedding-reader (``file_format="parquet_npy"``) and
autofaiss read: the ``.npy`` and ``.parquet`` files pair up by sorted name, row for row (``row`` is the
row in the paired ``.npy``). Shards are written one at a time, so a store is never assembled in memory;
``store.json`` is written last, so a folder without it is not a finished store.

Reading (:class:`EmbeddingStore`): the paths and labels are loaded (a few dozen bytes per image); the
vectors stay on disk and are read in chunks (:meth:`EmbeddingStore.chunks`) or by id
(:meth:`EmbeddingStore.take`), as float32, checked and L2-normalised. A :class:`FeatureSet` (an
``.npz`` in memory) offers the same two methods, so index building reads either the same way.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vitp.errors import RetrievalError
from vitp.files import atomic_path, read_json, write_json
from vitp.options import STORE_DTYPES
from vitp.retrieval.feature_file import FeatureSet, check_vectors, load_features, refuse_duplicate_paths
from vitp.retrieval.rerank import l2_normalise

logger = logging.getLogger("vitp")

STORE_FORMAT = "vitp-embedding-store"
STORE_VERSION = 1
STORE_MANIFEST = "store.json"
METADATA_COLUMNS = ("image_path", "label", "size", "mtime_ns", "row")
# Rows read at a time by default: 64 Ki rows of 1024 float32 = 256 MiB.
DEFAULT_CHUNK_ROWS = 65536
# Shard files kept open at once (one file descriptor each).
_OPEN_SHARDS = 32


def is_store_path(path: Path | str) -> bool:
    """How an output name chooses its format: ``*.npz`` is one features file, anything else a store folder."""
    return Path(path).suffix.lower() != ".npz"


def shard_name(number: int) -> str:
    return f"part-{number:06d}"


def write_shard(
    directory: Path,
    name: str,
    vectors: np.ndarray,
    image_paths: list[str],
    labels: list[str],
    sizes: list[int],
    mtimes: list[int],
    dtype: str,
) -> None:
    """One shard: the vectors, then their metadata, each written atomically (same input, same bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(directory / "embeddings" / f"{name}.npy") as tmp:
        with open(tmp, "wb") as handle:
            np.lib.format.write_array(handle, np.ascontiguousarray(vectors, dtype=dtype), allow_pickle=False)
    table = pa.table({
        "image_path": pa.array(image_paths, pa.string()),
        "label": pa.array(labels, pa.string()),
        "size": pa.array(sizes, pa.int64()),
        "mtime_ns": pa.array(mtimes, pa.int64()),
        "row": pa.array(np.arange(len(image_paths), dtype=np.int64)),
    })
    with atomic_path(directory / "metadata" / f"{name}.parquet") as tmp:
        pq.write_table(table, tmp)


def write_manifest(directory: Path, settings: dict[str, Any] | None, dtype: str, dimension: int,
                   shards: list[tuple[str, int]]) -> None:
    """``store.json``, last: it lists the shards and makes the folder a finished store."""
    write_json({
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "settings": settings,
        "dtype": dtype,
        "dimension": dimension,
        "count": sum(rows for _, rows in shards),
        "shards": [{"name": name, "rows": rows} for name, rows in shards],
    }, directory / STORE_MANIFEST)


@dataclass
class EmbeddingStore:
    """A finished store: metadata in memory, vectors read from the shards as asked."""

    directory: Path
    settings: dict[str, Any] | None
    dtype: str
    shard_names: list[str]
    offsets: np.ndarray  # int64 [shards + 1]: first row of each shard, then the count
    image_paths: np.ndarray  # str [N]
    labels: np.ndarray  # str [N]
    _dimension: int

    def __post_init__(self) -> None:
        self._opened: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._warned_norms = False

    @property
    def source(self) -> str:
        return str(self.directory)

    @property
    def dimension(self) -> int:
        return self._dimension

    def __len__(self) -> int:
        return int(self.offsets[-1])

    # ---------------------------------------------------------------------------------------------
    # Opening

    @classmethod
    def open(cls, path: Path | str) -> "EmbeddingStore":
        import pyarrow.parquet as pq

        directory = Path(path)
        manifest_path = directory / STORE_MANIFEST
        if not manifest_path.is_file():
            partial = directory.with_name(directory.name + ".partial")
            hint = (f"; {partial} holds an unfinished extraction: run the same `vitp features` command again to "
                    f"finish it" if partial.is_dir() else "")
            raise RetrievalError(f"{directory}: not a finished embedding store (no {STORE_MANIFEST}){hint}")
        manifest = _read_manifest(manifest_path)
        dimension, dtype = manifest["dimension"], manifest["dtype"]
        names, rows = [shard["name"] for shard in manifest["shards"]], [shard["rows"] for shard in manifest["shards"]]
        paths, labels = [], []
        for name, count in zip(names, rows):
            vectors_path = directory / "embeddings" / f"{name}.npy"
            metadata_path = directory / "metadata" / f"{name}.parquet"
            try:
                shape, stored_dtype = _npy_header(vectors_path)
                table = pq.read_table(metadata_path, columns=["image_path", "label"])
            except (OSError, ValueError) as err:
                raise RetrievalError(f"{directory}: damaged store: shard {name}: {err}") from None
            if shape != (count, dimension) or stored_dtype != np.dtype(dtype) or table.num_rows != count:
                raise RetrievalError(
                    f"{directory}: damaged store: shard {name} holds {shape} {stored_dtype} vectors and {table.num_rows} "
                    f"metadata rows; {STORE_MANIFEST} says {count} x {dimension} {dtype}"
                )
            paths.append(table.column("image_path").to_numpy(zero_copy_only=False).astype(str))
            labels.append(table.column("label").to_numpy(zero_copy_only=False).astype(str))
        image_paths = np.concatenate(paths) if paths else np.array([], dtype=str)
        refuse_duplicate_paths(image_paths, directory)
        if not len(image_paths):
            raise RetrievalError(f"{directory}: the store holds no vectors")
        offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        return cls(directory, manifest["settings"], dtype, names, offsets, image_paths, np.concatenate(labels), dimension)

    # ---------------------------------------------------------------------------------------------
    # Reading vectors

    def chunks(self, rows: int = DEFAULT_CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 [<= rows, D]) over the whole store, in order, never more than one chunk in memory."""
        for start in range(0, len(self), rows):
            yield start, self.take(np.arange(start, min(start + rows, len(self))))

    def take(self, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (any order, repeats allowed) as checked, L2-normalised float32 [len(ids), D]."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"row ids must be in 0..{len(self) - 1}")
        unique, inverse = np.unique(ids, return_inverse=True)
        rows = np.empty((len(unique), self.dimension), dtype=np.float32)
        shard_of = np.searchsorted(self.offsets, unique, side="right") - 1
        for shard in np.unique(shard_of):
            where = np.flatnonzero(shard_of == shard)
            rows[where] = self._read_rows(int(shard), unique[where] - self.offsets[shard])
        in_order = len(unique) == len(ids) and bool(np.all(unique == ids))  # sorted and distinct: no copy needed
        return self._checked(rows if in_order else rows[inverse], ids)
    def load(self) -> FeatureSet:
        """The whole store in memory, as a FeatureSet (query sets, small galleries)."""
        features = np.empty((len(self), self.dimension), dtype=np.float32)
        for start, chunk in self.chunks():
            features[start : start + len(chunk)] = chunk
        return FeatureSet(features, self.image_paths, self.labels, self.settings, self.source)

    def _read_rows(self, shard: int, rows: np.ndarray) -> np.ndarray:
        """Sorted, distinct rows of one shard, read run by run with ``pread``: no memory map, so what was
        read does not stay counted in this process's memory (only in the OS's page cache)."""
        descriptor, data_offset = self._open(shard)
        itemsize = np.dtype(self.dtype).itemsize
        row_bytes = self.dimension * itemsize
        out = np.empty((len(rows), self.dimension), dtype=self.dtype)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for first, last in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
            count = int(last - first)
            data = os.pread(descriptor, count * row_bytes, data_offset + int(rows[first]) * row_bytes)
            if len(data) != count * row_bytes:
                raise RetrievalError(f"{self.directory}: shard {self.shard_names[shard]} is shorter than its header says")
            out[first:last] = np.frombuffer(data, dtype=self.dtype).reshape(count, self.dimension)
        return out

    def _open(self, number: int) -> tuple[int, int]:
        """(file descriptor, offset of the first row) of a shard's .npy, kept open for the next reads."""
        opened = self._opened.get(number)
        if opened is None:
            path = self.directory / "embeddings" / f"{self.shard_names[number]}.npy"
            try:
                with open(path, "rb") as handle:
                    _npy_header_of(handle)
                    data_offset = handle.tell()
                descriptor = os.open(path, os.O_RDONLY)
            except (OSError, ValueError) as err:
                raise RetrievalError(f"{self.directory}: cannot read shard {path.name} ({err})") from None
            opened = self._opened[number] = (descriptor, data_offset)
            if len(self._opened) > _OPEN_SHARDS:
                os.close(self._opened.popitem(last=False)[1][0])
        else:
            self._opened.move_to_end(number)
        return opened

    def close(self) -> None:
        while self._opened:
            os.close(self._opened.popitem()[1][0])

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass

    def _checked(self, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
        normalised, was_unit = check_vectors(vectors, lambda row: self._describe_row(int(ids[row])))
        if self.dtype == "float16":
            return l2_normalise(normalised)  # float16 rounding moves every norm a little off 1
        if not was_unit and not self._warned_norms:
            logger.warning("%s: vectors are not L2-normalised; normalising them so that inner product is cosine "
                           "similarity", self.directory)
            self._warned_norms = True
        return normalised

    def _describe_row(self, row: int) -> str:
        shard = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return (f"{self.directory}: shard {self.shard_names[shard]} row {row - self.offsets[shard]} "
                f"({self.image_paths[row]})")


def open_gallery(path: Path | str) -> FeatureSet | EmbeddingStore:
    """Gallery features to index: an ``.npz`` (read into memory) or an embedding store (streamed)."""
    path = Path(path)
    return EmbeddingStore.open(path) if path.is_dir() else load_features(path)


def load_feature_set(path: Path | str) -> FeatureSet:
    """Features in memory, from an ``.npz`` or a (small) embedding store: query sets, PCA fit sets."""
    path = Path(path)
    return EmbeddingStore.open(path).load() if path.is_dir() else load_features(path)


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    with open(path, "rb") as handle:
        return _npy_header_of(handle)


def _npy_header_of(handle) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of an .npy file opened at its start; leaves it at the first byte of data."""
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(handle)
    if fortran_order:
        raise ValueError("a Fortran-ordered array; rows must be contiguous")
    return tuple(shape), dtype


_MANIFEST_FIELDS = {"settings": (dict, type(None)), "dtype": (str,), "dimension": (int,), "shards": (list,)}


def _read_manifest(path: Path) -> dict[str, Any]:
    manifest = read_json(path, RetrievalError)
    if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT:
        raise RetrievalError(f"{path}: not a vitp embedding store manifest")
    if manifest.get("version") != STORE_VERSION:
        raise RetrievalError(f"{path}: store version {manifest.get('version')!r}; this vitp reads version {STORE_VERSION}")
    wrong = [key for key, types in _MANIFEST_FIELDS.items() if not isinstance(manifest.get(key), types)]
    if not wrong and manifest["dtype"] not in STORE_DTYPES:
        wrong.append(f"dtype {manifest['dtype']!r}")
    shards = manifest.get("shards") if isinstance(manifest.get("shards"), list) else []
    if any(not isinstance(s, dict) or not isinstance(s.get("name"), str) or not isinstance(s.get("rows"), int)
           for s in shards):
        wrong.append("shards (each needs a name and a whole number of rows)")
    if wrong:
        raise RetrievalError(f"damaged store: {path}: {', '.join(wrong)}")
    return manifest
