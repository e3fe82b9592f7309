"""The Milvus backend: the gallery in a Milvus collection, in Milvus Lite (a local ``.db`` file, embedded:
nothing to start) or a Milvus standalone or cluster (``http://host:19530``).

The collection holds everything needed to search it: ``id`` (INT64 primary key = the gallery row),
``vector`` (FLOAT_VECTOR, inner-product index: FLAT by default, which is exact), ``path`` and
``label``; its properties hold the gallery's feature settings (with the model fingerprint), what it
was built from, and whether the build finished. The index directory only says where it is
(``meta.json`` with backend ``milvus``, the URI and the collection name), so every command takes
``--index DIR`` whichever engine is behind it. A token for a secured cluster is read from the
``MILVUS_TOKEN`` environment variable and never written down.

Building inserts batches of rows in id order; the collection stays marked unfinished until the last
batch is in. A failed call (a dropped connection, a busy server) is retried with a new client, each
retry reported; a batch whose insert may or may not have happened is written again with upsert,
which replaces rows by id instead of duplicating them. A build that still fails leaves the
collection marked unfinished: searching it is refused, and the same build command continues from the
rows already there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
from vitp.progress import progress

import vitp
from vitp.errors import RetrievalError
from vitp.retrieval.index import (
    INDEX_FORMAT,
    INDEX_VERSION,
    RetrievalIndex,
    check_index_output,
    check_search_parameters,
    drop_excluded,
    source_path,
    write_meta,
)
from vitp.retrieval.rerank import l2_normalise

logger = logging.getLogger("vitp")

INDEX_TYPES = ("FLAT", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW", "DISKANN", "AUTOINDEX")
# Search parameter names: vitp's (FAISS's) -> Milvus's.
_SEARCH_PARAMETER_NAMES = {"nprobe": "nprobe", "efSearch": "ef"}
_PROPERTY_SETTINGS, _PROPERTY_BUILD, _PROPERTY_COMPLETE = "vitp.settings", "vitp.build", "vitp.complete"
_MAX_VARCHAR = 65535
_MAX_TOP_K = 16384  # Milvus's limit on results per query (and on rows per query call)
_REQUEST_BYTES = 16 * 2**20  # vectors per insert / search request, well under gRPC's 64 MiB message limit
RETRIES = 5
RETRY_FIRST_DELAY_S = 1.0
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


def is_local_file(uri: str) -> bool:
    """A Milvus Lite database file (embedded) rather than the address of a Milvus server."""
    return "://" not in uri


def default_collection_name(directory: Path | str) -> str:
    """A Milvus collection name (letters, digits, underscores) from the index directory's name."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", Path(directory).name.removesuffix(".index")) or "gallery"
    return ("vitp_" + name)[:255]


def check_collection_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise RetrievalError(f"Milvus collection name {name!r}: use letters, digits and underscores, starting "
                                  f"with a letter or underscore (at most 255 characters)")


class Connection:
    """A MilvusClient that is re-created and retried when a call fails for a reason other than the
    input (a dropped connection, a restarting server); each retry is reported."""

    def __init__(self, uri: str):
        self.uri = uri
        self.client = None
        self.retries = RETRIES
        self.first_delay_s = RETRY_FIRST_DELAY_S

    def call(self, what: str, action: Callable[[Any], Any], retry_action: Callable[[Any], Any] | None = None) -> Any:
        """``action(client)``; after a failure ``retry_action(client)`` (default: the same action)."""
        from pymilvus.exceptions import MilvusException

        delay = self.first_delay_s
        for attempt in range(1, self.retries + 1):
            try:
                if self.client is None:
                    self.client = self._connect()
                return (action if attempt == 1 or retry_action is None else retry_action)(self.client)
            except (MilvusException, ConnectionError, TimeoutError, OSError) as err:
                if isinstance(err, MilvusException) and err.is_input_error:
                    raise RetrievalError(f"Milvus at {self.uri} refused to {what}: {_reason(err)}") from None
                if attempt == self.retries:
                    raise RetrievalError(
                        f"Milvus at {self.uri}: could not {what} after {self.retries} attempts: {_reason(err)}"
                    ) from None
                logger.warning("Milvus at %s: could not %s (%s); retrying (%d of %d) in %.1f s",
                               self.uri, what, _reason(err), attempt, self.retries - 1, delay)
                self.close()
                time.sleep(delay)
                delay *= 2

    def _connect(self):
        from pymilvus import MilvusClient

        if is_local_file(self.uri):
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
        token = os.environ.get("MILVUS_TOKEN", "")
        try:
            return MilvusClient(uri=self.uri, token=token) if token else MilvusClient(uri=self.uri)
        except Exception:
            if is_local_file(self.uri) and _locked_elsewhere(Path(self.uri) / "LOCK"):
                raise RetrievalError(
                    f"Milvus Lite file {self.uri} is in use by another process, and a Milvus Lite file serves one "
                    f"process at a time: stop the other one (a `vitp serve`?), or put the collection on a Milvus "
                    f"server to use it from several processes"
                ) from None
            raise

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - a broken client may fail to close; a new one is made anyway
                pass
            self.client = None


def _locked_elsewhere(lock_file: Path) -> bool:
    """Whether another process holds the lock Milvus Lite takes on its data folder (pymilvus only says
    "Open local milvus failed")."""
    import fcntl

    try:
        descriptor = os.open(lock_file, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(descriptor)  # releases the probe's own lock, if it got one
    return False


def _reason(err: BaseException) -> str:
    return getattr(err, "message", "") or str(err) or type(err).__name__


def _source_digest(gallery) -> str:
    """What the collection was built from: model, sizes and every image path."""
    digest = hashlib.sha256()
    settings = gallery.settings or {}
    digest.update(json.dumps([len(gallery), gallery.dimension, settings.get("model_fingerprint"),
                              settings.get("layer"), settings.get("pool"), settings.get("image_size")]).encode())
    for path in gallery.image_paths:
        digest.update(str(path).encode("utf-8", "surrogatepass") + b"\n")
    return "sha256:" + digest.hexdigest()[:32]


def _batch_rows(dimension: int) -> int:
    return max(1, min(_MAX_TOP_K, _REQUEST_BYTES // (4 * dimension + 512)))


class MilvusIndex(RetrievalIndex):
    """A gallery in a Milvus collection, searched through the same interface as a FAISS index."""

    backend = "milvus"

    def __init__(self, connection: Connection, collection: str, image_paths: np.ndarray, labels: np.ndarray,
                 meta: dict[str, Any]):
        super().__init__(image_paths, labels, meta)
        self.connection = connection
        self.collection = collection
        self.search_params: dict[str, Any] = {}
        self._all_vectors: np.ndarray | None = None
        self.set_search_parameters(meta.get("search_parameters") or {})

    # ---------------------------------------------------------------------------------------------
    # Building

    @classmethod
    def build(
        cls,
        gallery,
        *,
        uri: str,
        collection: str,
        index_type: str = "FLAT",
        index_params: dict[str, Any] | None = None,
        search_parameters: dict[str, Any] | None = None,
        progress_bar: bool = True,
        **unsupported,
    ) -> "MilvusIndex":
        """Put ``gallery`` (a FeatureSet or an embedding store) into ``collection`` at ``uri``, continuing
        an unfinished build of the same gallery; see the module docstring."""
        _refuse_faiss_options(unsupported)
        check_collection_name(collection)
        if index_type not in INDEX_TYPES:
            raise RetrievalError(f"Milvus index type {index_type!r}: expected one of {', '.join(INDEX_TYPES)}")
        long_paths = [p for p in gallery.image_paths if len(str(p).encode()) > _MAX_VARCHAR]
        if long_paths:
            raise RetrievalError(f"{len(long_paths)} image paths are longer than Milvus's {_MAX_VARCHAR} bytes "
                                      f"(first: {long_paths[0][:80]}...)")
        connection = Connection(uri)
        digest = _source_digest(gallery)
        start = _resume_point(connection, collection, digest, len(gallery))
        if start is None:
            _create_collection(connection, collection, gallery.dimension, index_type, index_params or {})
            start = 0
        else:
            logger.info("continuing the unfinished build of %s at %s: %d of %d rows are in", collection, uri, start,
                        len(gallery))
        build = {"format": INDEX_FORMAT, "source_digest": digest, "count": len(gallery), "dimension": gallery.dimension,
                 "features_file": source_path(gallery), "index_type": index_type, "index_params": index_params or {}}
        _set_properties(connection, collection, {
            _PROPERTY_SETTINGS: json.dumps(gallery.settings), _PROPERTY_BUILD: json.dumps(build),
            _PROPERTY_COMPLETE: "false",
        })
        _insert_rows(connection, collection, gallery, start, progress_bar)
        connection.call("flush the collection", lambda client: client.flush(collection))
        count = _row_count(connection, collection)
        if count != len(gallery):
            raise RetrievalError(f"collection {collection} at {uri} holds {count} rows after the build, not "
                                     f"{len(gallery)}; it stays marked unfinished: run the same build again")
        _set_properties(connection, collection, {_PROPERTY_COMPLETE: "true"})
        meta = _meta(uri, collection, build, gallery.settings, search_parameters or {})
        index = cls(connection, collection, np.asarray(gallery.image_paths, dtype=str),
                    np.asarray(gallery.labels, dtype=str), meta)
        index.name = f"Milvus collection {collection} of {gallery.source}"
        return index

    # ---------------------------------------------------------------------------------------------
    # Saving and loading

    def save(self, directory: Path | str) -> Path:
        """``meta.json`` (where the collection is) in ``directory``; a Milvus Lite file inside the
        directory is recorded by its name, so the directory can be moved."""
        directory = Path(directory)
        check_index_output(directory)
        directory.mkdir(parents=True, exist_ok=True)
        uri = self.meta["milvus"]["uri"]
        if is_local_file(uri) and Path(uri).resolve().parent == directory.resolve():
            uri = Path(uri).name
        for stale in ("index.faiss", "items.npz", "vectors.npy"):  # a FAISS index this directory held before
            (directory / stale).unlink(missing_ok=True)
        meta = {**self.meta, "milvus": {**self.meta["milvus"], "uri": uri}}
        write_meta(directory, meta)
        self.meta["path"] = self.name = str(directory)
        return directory

    @classmethod
    def load(cls, directory: Path, meta: dict[str, Any]) -> "MilvusIndex":
        where = meta.get("milvus")
        if not isinstance(where, dict) or not isinstance(where.get("uri"), str) or not isinstance(where.get("collection"), str):
            raise RetrievalError(f"damaged index: {directory / 'meta.json'}: no Milvus uri and collection")
        uri, collection = where["uri"], where["collection"]
        if is_local_file(uri) and not Path(uri).is_absolute():
            uri = str(directory / uri)
        if is_local_file(uri) and not Path(uri).exists():
            raise RetrievalError(f"{directory}: its Milvus Lite file {uri} does not exist")
        connection = Connection(uri)
        if not connection.call("look up the collection", lambda client: client.has_collection(collection)):
            raise RetrievalError(f"{directory}: Milvus at {uri} has no collection {collection!r}")
        properties = _properties(connection, collection)
        if _PROPERTY_BUILD not in properties:
            raise RetrievalError(f"Milvus collection {collection!r} at {uri} was not made by `vitp index build`")
        build = json.loads(properties[_PROPERTY_BUILD])
        if properties.get(_PROPERTY_COMPLETE) != "true":
            raise RetrievalError(
                f"Milvus collection {collection!r} at {uri} is unfinished (its build stopped before every vector was "
                f"in): run the same `vitp index build` again to finish it"
            )
        settings = json.loads(properties[_PROPERTY_SETTINGS])
        connection.call("load the collection", lambda client: client.load_collection(collection))
        paths, labels = _read_items(connection, collection, build["count"])
        loaded_meta = {**_meta(uri, collection, build, settings, meta.get("search_parameters") or {}),
                       "path": str(directory)}
        return cls(connection, collection, paths, labels, loaded_meta)

    # ---------------------------------------------------------------------------------------------
    # Searching

    def set_search_parameters(self, parameters: dict[str, Any]) -> None:
        check_search_parameters(parameters)
        for name, value in parameters.items():
            if name not in _SEARCH_PARAMETER_NAMES:
                raise RetrievalError(f"search parameter {name} does not apply to a Milvus collection "
                                          f"(known: {', '.join(_SEARCH_PARAMETER_NAMES)})")
            self.search_params[_SEARCH_PARAMETER_NAMES[name]] = int(value)

    def prepare_queries(self, features: np.ndarray) -> np.ndarray:
        return l2_normalise(np.ascontiguousarray(features, dtype=np.float32))

    def top_k(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        depth = k + (exclude is not None)
        if depth > _MAX_TOP_K:
            raise RetrievalError(f"Milvus returns at most {_MAX_TOP_K} results per query; asked for {depth}")
        scores = np.full((len(queries), depth), -np.inf, dtype=np.float32)
        ids = np.full((len(queries), depth), -1, dtype=np.int64)
        step = _batch_rows(self.dimension)
        parameters = {"metric_type": "IP", "params": dict(self.search_params)}
        for start in range(0, len(queries), step):
            batch = np.ascontiguousarray(queries[start : start + step], dtype=np.float32)
            hits = self.connection.call("search", lambda client: client.search(
                self.collection, data=list(batch), limit=depth, search_params=parameters, output_fields=[]))
            for row, found in enumerate(hits):
                found = list(found)[:depth]
                ids[start + row, : len(found)] = [hit["id"] for hit in found]
                scores[start + row, : len(found)] = [hit["distance"] for hit in found]
        return drop_excluded(scores, ids, exclude, k)

    def vectors_by_id(self, ids: np.ndarray) -> np.ndarray:
        unique, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)
        found = np.empty((len(unique), self.dimension), dtype=np.float32)
        step = _batch_rows(self.dimension)
        for start in range(0, len(unique), step):
            wanted = unique[start : start + step]
            rows = self.connection.call("read vectors", lambda client: client.get(
                self.collection, ids=wanted.tolist(), output_fields=["vector"]))
            position = {int(row["id"]): np.asarray(row["vector"], dtype=np.float32) for row in rows}
            missing = [int(i) for i in wanted if int(i) not in position]
            if missing:
                raise RetrievalError(f"collection {self.collection} lacks rows {missing[:5]}: it changed since it was built")
            found[start : start + len(wanted)] = [position[int(i)] for i in wanted]
        return found[inverse]

    def all_gallery_vectors(self) -> np.ndarray:
        if self._all_vectors is None:
            self._all_vectors = self.vectors_by_id(np.arange(len(self)))
        return self._all_vectors

    def describe(self) -> str:
        where = self.meta["milvus"]
        kind = "Milvus Lite" if is_local_file(where["uri"]) else "Milvus"
        params = "".join(f", {name}={value}" for name, value in self.search_params.items())
        return f"{kind} {where['index_type']} collection {self.collection} of {len(self)} x {self.dimension}{params}"


# --------------------------------------------------------------------------------------------------
# Building steps


def _refuse_faiss_options(options: dict[str, Any]) -> None:
    """PCA, DBA and memory budgets shape a FAISS index; a Milvus collection holds the features as they are."""
    given = {name: value for name, value in options.items()
             if value not in (None, False, 0, 0.0, "auto") and name not in ("progress_bar", "measure_recall", "faiss_device")}
    if given:
        raise RetrievalError(
            f"{', '.join(sorted(given))}: not available with Milvus (PCA, whitening, DBA and memory budgets shape a "
            f"FAISS index; a Milvus collection holds the features as they are)"
        )


def _properties(connection: Connection, collection: str) -> dict[str, str]:
    described = connection.call("describe the collection", lambda client: client.describe_collection(collection))
    return dict(described.get("properties") or {})


def _set_properties(connection: Connection, collection: str, properties: dict[str, str]) -> None:
    connection.call("record the build", lambda client: client.alter_collection_properties(collection, properties=properties))


def _row_count(connection: Connection, collection: str, where: str = "") -> int:
    result = connection.call("count rows", lambda client: client.query(collection, filter=where, output_fields=["count(*)"]))
    return int(result[0]["count(*)"])


def _resume_point(connection: Connection, collection: str, digest: str, count: int) -> int | None:
    """Rows already in an unfinished build of the same gallery, or None to start afresh (an existing
    vitp collection is dropped; anything else is left alone and refused)."""
    if not connection.call("look up the collection", lambda client: client.has_collection(collection)):
        return None
    properties = _properties(connection, collection)
    if _PROPERTY_BUILD not in properties:
        raise RetrievalError(f"Milvus collection {collection!r} at {connection.uri} exists and was not made by "
                                  f"vitp; not overwriting it (choose another collection name)")
    build = json.loads(properties[_PROPERTY_BUILD])
    if properties.get(_PROPERTY_COMPLETE) != "true" and build.get("source_digest") == digest:
        connection.call("load the collection", lambda client: client.load_collection(collection))
        present = _row_count(connection, collection)
        # Rows go in by increasing id and retries replace rather than add: ids 0..present-1 must be there.
        if present <= count and _row_count(connection, collection, f"id < {present}") == present:
            return present
        logger.warning("collection %s holds rows that do not continue a build in order; starting over", collection)
    connection.call("drop the old collection", lambda client: client.drop_collection(collection))
    return None


def _create_collection(connection: Connection, collection: str, dimension: int, index_type: str,
                       index_params: dict[str, Any]) -> None:
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dimension)
    schema.add_field("path", DataType.VARCHAR, max_length=_MAX_VARCHAR)
    schema.add_field("label", DataType.VARCHAR, max_length=_MAX_VARCHAR)

    def create(client) -> None:
        index = client.prepare_index_params()
        index.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=index_params)
        # pymilvus first asks for a timestamp that Milvus Lite's embedded server does not offer; the server
        # logs that as an error with a traceback, and pymilvus goes on without it. Keep that out of the output.
        server_log = logging.getLogger("grpc._server")
        level = server_log.level
        server_log.setLevel(logging.CRITICAL)
        try:
            client.create_collection(collection, schema=schema, index_params=index, consistency_level="Strong")
        finally:
            server_log.setLevel(level)

    connection.call("create the collection", create)


def _insert_rows(connection: Connection, collection: str, gallery, start: int, progress_bar: bool) -> None:
    """Rows ``start..`` in batches, by increasing id; a retried batch is upserted (never duplicated)."""
    step = _batch_rows(gallery.dimension)
    with progress(total=len(gallery), initial=start, unit="vec", desc="milvus", show=progress_bar) as bar:
        for first in range(start, len(gallery), step):
            ids = np.arange(first, min(first + step, len(gallery)))
            vectors = gallery.take(ids)
            rows = [{"id": int(i), "vector": vector, "path": str(gallery.image_paths[i]), "label": str(gallery.labels[i])}
                    for i, vector in zip(ids, vectors)]
            connection.call(f"insert rows {ids[0]}..{ids[-1]}",
                            lambda client: client.insert(collection, rows),
                            retry_action=lambda client: client.upsert(collection, rows))
            bar.update(len(ids))


def _read_items(connection: Connection, collection: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    paths, labels = np.empty(count, dtype=object), np.empty(count, dtype=object)
    for first in range(0, count, _MAX_TOP_K):
        last = min(first + _MAX_TOP_K, count)
        rows = connection.call("read paths and labels", lambda client: client.query(
            collection, filter=f"id >= {first} and id < {last}", output_fields=["id", "path", "label"], limit=last - first))
        for row in rows:
            paths[row["id"]], labels[row["id"]] = row["path"], row["label"]
    if any(path is None for path in paths):
        raise RetrievalError(f"Milvus collection {collection} lacks some of its {count} rows")
    return paths.astype(str), labels.astype(str)


def _meta(uri: str, collection: str, build: dict[str, Any], settings: dict[str, Any] | None,
          search_parameters: dict[str, Any]) -> dict[str, Any]:
    """meta.json of a Milvus index: the fields every index has, and where the collection is."""
    return {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "vitp_version": vitp.__version__,
        "backend": "milvus",
        "factory": f"Milvus {build['index_type']}",
        "metric": "inner_product",
        "count": build["count"],
        "dimension": build["dimension"],
        "feature_dimension": build["dimension"],
        "features_file": build["features_file"],
        "feature_settings": settings,
        "pca": None,
        "dba": None,
        "search_parameters": search_parameters,
        "stores_vectors": False,
        "milvus": {"uri": uri, "collection": collection, "index_type": build["index_type"],
                   "index_params": build["index_params"]},
    }
