"""The ``.npz`` features file: the seed's ``features`` and ``image_paths``, plus ``labels`` and the
settings that produced them.

Layout (every member a plain array, readable with ``np.load(path)`` and no pickle):

* ``features``     float32 [N, D], L2-normalised
* ``image_paths``  str [N]
* ``labels``       str [N], the parent folder's name (the class)
* ``settings``     str, a JSON object: the model's fingerprint and config, the layer, pooling, image
  size, dtype, ... (see :func:`vitp.retrieval.extract.embedder.extraction_settings`)

Files written by the seed script (no ``labels``, no ``settings``) are read too: labels come from the
parent folder, as the seed does, and compatibility cannot be checked (a warning says so).

:func:`check_compatible` is the one place that decides whether two sets of features can be compared:
the same model weights, layer, pooling and input size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Iterator

import numpy as np

from vitp.errors import RetrievalError
from vitp.files import atomic_path

logger = logging.getLogger("vitp")

FEATURES_FORMAT = "vitp-features"
# The settings that change what a feature vector means. Two feature sets are comparable only when all agree.
COMPATIBILITY_KEYS = ("model_fingerprint", "layer", "pool", "image_size")
# Norms further than this from 1 mean the features were not L2-normalised.
_NORM_TOLERANCE = 1e-3
# Bytes of float64 rows whose norms are computed at a time.
_NORM_CHUNK_BYTES = 8 * 2**20


@dataclass
class FeatureSet:
    """Feature vectors of a set of images, with where each came from."""

    features: np.ndarray  # float32 [N, D]
    image_paths: np.ndarray  # str [N]
    labels: np.ndarray  # str [N]
    settings: dict[str, Any] | None  # None for files written by the seed's script
    source: str = "<memory>"

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise RetrievalError(f"{self.source}: 'features' must be 2-D [N, D], got shape {self.features.shape}")
        count = len(self.features)
        for name in ("image_paths", "labels"):
            if len(getattr(self, name)) != count:
                raise RetrievalError(
                    f"{self.source}: '{name}' has {len(getattr(self, name))} entries but 'features' has {count} rows"
                )

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dimension(self) -> int:
        return int(self.features.shape[1])

    # The reading interface shared with the embedding store (vitp.retrieval.embedding_store), so that an
    # index is built the same way from features in memory and from shards on disk.

    def chunks(self, rows: int = 65536) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, float32 [<= rows, D]) in order."""
        for start in range(0, len(self), rows):
            yield start, self.features[start : start + rows]

    def take(self, ids: np.ndarray) -> np.ndarray:
        return self.features[np.asarray(ids, dtype=np.int64)]


def labels_from_paths(image_paths: np.ndarray) -> np.ndarray:
    """The class of an image is the name of the folder it is in (as in the seed)."""
    return np.array([PurePath(str(path)).parent.name for path in image_paths], dtype=str)


def save_features(feature_set: FeatureSet, path: Path | str) -> Path:
    """Write atomically, with fixed zip timestamps so that the same features give the same bytes."""
    path = Path(path)
    arrays = {
        "features": np.ascontiguousarray(feature_set.features, dtype=np.float32),
        "image_paths": np.asarray(feature_set.image_paths, dtype=str),
        "labels": np.asarray(feature_set.labels, dtype=str),
        "settings": np.array(json.dumps(feature_set.settings or {}, sort_keys=True)),
    }
    write_npz(arrays, path)
    return path


def write_npz(arrays: dict[str, np.ndarray], path: Path) -> None:
    """``np.savez`` without its wall-clock timestamps in the zip entries, written atomically."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def replace_directory(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``; an existing ``target`` is moved aside first and removed after
    (a reader sees the old folder or the new one, never a mix)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_features(path: Path | str) -> FeatureSet:
    """Read a features file (vitp's or the seed's), checking every member."""
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"{path}: no such features file")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic[:2] != b"PK":  # an .npz is a zip archive; anything else would reach numpy's pickle loader
        kind = "a single .npy array" if magic[:1] == b"\x93" else "not a zip archive"
        raise RetrievalError(f"{path}: not a readable .npz features file ({kind})")
    try:
        with np.load(path, allow_pickle=False) as data:
            members = set(data.files)
            for required in ("features", "image_paths"):
                if required not in members:
                    raise RetrievalError(
                        f"{path}: no '{required}' array (found: {', '.join(sorted(members)) or 'nothing'}); a features "
                        f"file holds 'features' [N, D] and 'image_paths' [N], as `vitp features` writes"
                    )
            features = data["features"]
            image_paths = data["image_paths"].astype(str)
            labels = data["labels"].astype(str) if "labels" in members else None
            settings = _parse_settings(data["settings"], path) if "settings" in members else None
    except RetrievalError:
        raise
    except ValueError as err:  # object arrays (pickles) and malformed members
        raise RetrievalError(f"{path}: cannot read as a features file ({err})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise RetrievalError(f"{path}: not a readable .npz file ({err})") from None

    for name, array in (("image_paths", image_paths), ("labels", labels)):
        if array is not None and array.ndim != 1:
            raise RetrievalError(f"{path}: '{name}' must be a 1-D list of strings, got shape {array.shape}")
    if len(image_paths) != len(features):
        raise RetrievalError(
            f"{path}: 'image_paths' has {len(image_paths)} entries but 'features' has {len(features)} rows"
        )
    if labels is not None and len(labels) != len(features):
        raise RetrievalError(f"{path}: 'labels' has {len(labels)} entries but 'features' has {len(features)} rows")
    refuse_duplicate_paths(image_paths, path)
    if not np.issubdtype(features.dtype, np.floating):
        raise RetrievalError(f"{path}: 'features' must be floating point, got {features.dtype}")
    if features.ndim != 2 or len(features) == 0:
        raise RetrievalError(f"{path}: 'features' must be a non-empty [N, D] array, got shape {features.shape}")
    if settings is None:
        logger.warning(
            "%s has no vitp settings (written by another tool?): cannot check that its features come from the "
            "same model, layer and pooling as the features it is compared with", path
        )
    if labels is None:
        labels = labels_from_paths(image_paths)
    features, was_unit = check_vectors(features, lambda row: f"{path}: feature row {row}, {image_paths[row]}")
    if not was_unit:
        logger.warning("%s: features are not L2-normalised; normalising them so that inner product is cosine "
                       "similarity", path)
    return FeatureSet(features, image_paths, labels, settings, source=str(path))


def refuse_duplicate_paths(image_paths: np.ndarray, path: Path) -> None:
    """An image listed twice finds its own copy: leave-one-out (which removes a query by its path)
    would then count it as a perfect match, and every metric would be inflated."""
    unique, counts = np.unique(image_paths, return_counts=True)
    repeated = unique[counts > 1]
    if len(repeated):
        shown = ", ".join(f"{name} ({count}x)" for name, count in zip(repeated[:3], counts[counts > 1][:3]))
        more = f", ... ({len(repeated) - 3} more)" if len(repeated) > 3 else ""
        raise RetrievalError(
            f"{path}: {len(repeated)} image paths appear more than once: {shown}{more}; each image must be listed "
            f"once (merged features files? extract them again with `vitp features`)"
        )


def _parse_settings(member: np.ndarray, path: Path) -> dict[str, Any]:
    try:
        settings = json.loads(str(member.item()))
    except (json.JSONDecodeError, ValueError) as err:
        raise RetrievalError(f"{path}: 'settings' is not valid JSON ({err})") from None
    if not isinstance(settings, dict):
        raise RetrievalError(f"{path}: 'settings' must be a JSON object")
    return settings


def check_vectors(vectors: np.ndarray, describe_row) -> tuple[np.ndarray, bool]:
    """Float32, finite, non-zero rows, L2-normalised (inner product is cosine similarity only on unit
    vectors). Returns the vectors and whether they already were unit vectors; ``describe_row(i)``
    names row ``i`` in error messages."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise RetrievalError(f"{int((~finite).sum())} feature rows hold NaN or inf (first: {describe_row(row)})")
    norms = _row_norms(vectors)
    if np.any(norms == 0):
        raise RetrievalError(f"a feature row is all zeros and cannot be normalised: {describe_row(int(np.flatnonzero(norms == 0)[0]))}")
    if np.abs(norms - 1).max() <= _NORM_TOLERANCE:
        return vectors, True
    if norms.max() < np.finfo(np.float32).max:
        return vectors / norms[:, None].astype(np.float32), False  # no float64 copy of the vectors
    return (vectors / norms[:, None]).astype(np.float32), False


def _row_norms(features: np.ndarray) -> np.ndarray:
    """L2 norm of each row, summed in float64: in float32 the squares of values above ~1e19 overflow
    to inf, and dividing by inf would turn those rows into zeros. Chunked to bound the float64 copy."""
    norms = np.empty(len(features), dtype=np.float64)
    rows = max(1, _NORM_CHUNK_BYTES // (8 * max(features.shape[1], 1)))
    for start in range(0, len(features), rows):
        chunk = features[start : start + rows].astype(np.float64)
        norms[start : start + len(chunk)] = np.linalg.norm(chunk, axis=1)
    return norms


def check_compatible(
    reference: dict[str, Any] | None,
    candidate: dict[str, Any] | None,
    reference_name: str,
    candidate_name: str,
) -> None:
    """Refuse to compare features made by different models, layers, poolings or input sizes."""
    if reference is None or candidate is None:
        missing = reference_name if reference is None else candidate_name
        logger.warning("%s records no feature settings: cannot check compatibility with %s", missing,
                       candidate_name if reference is None else reference_name)
        return
    differences = []
    for key in COMPATIBILITY_KEYS:
        if reference.get(key) != candidate.get(key):
            differences.append(f"{key}: {candidate.get(key)!r} in {candidate_name}, {reference.get(key)!r} in {reference_name}")
    if differences:
        checkpoints = (
            f"(checkpoints: {candidate.get('vit_checkpoint', '?')} for {candidate_name}, "
            f"{reference.get('vit_checkpoint', '?')} for {reference_name})"
        )
        raise RetrievalError(
            f"{candidate_name} and {reference_name} were made with different feature settings, so their similarities "
            f"mean nothing:\n  " + "\n  ".join(differences) + f"\n  {checkpoints}\n"
            f"Extract both with the same vit_checkpoint, select_layer, pool and image_size."
        )
