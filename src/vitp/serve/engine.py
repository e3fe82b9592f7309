"""The search behind `vitp serve`: a saved index, the ViT that embedded its gallery, and thumbnails.

A query image (an upload, or a gallery file) goes through exactly what `vitp features` did to the
gallery: decoded with the same limits, InternVL's transform at the model's size, the index's layer
and pooling, L2-normalised; the ViT must be the one whose fingerprint the index records. Only files
listed in the index are ever read from disk (thumbnails, gallery queries): a path is looked up in the
index's list of paths, never joined onto a folder, so ``..``, other absolute paths and symlinks that
were not indexed cannot reach anything.

Everything here is safe to call from many threads at once (the web server's thread pool).
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import cachetools
import numpy as np
from PIL import Image

from vitp.data.images import DEFAULT_MAX_PIXELS, ImageError, build_transform, decode_image, load_image
from vitp.errors import ServeError
from vitp.retrieval.extract.embedder import FeatureModel, embed_batch, extraction_settings
from vitp.retrieval.index import RetrievalIndex

# Pillow formats an upload may be in: those of the files `vitp features` indexes (.jpg .png .tif .bmp
# .webp; Pillow's JPEG opener also covers multi-picture camera JPEGs). Naming them keeps Pillow's other
# decoders, some of which call external programs (EPS -> Ghostscript), away from untrusted bytes.
UPLOAD_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")
# The HTTP status of an upload refused for each ImageError kind (any other kind: 400).
UPLOAD_STATUS = {"unsupported": 415, "too large": 413}
THUMBNAIL_QUALITY = 85
# Thumbnails are cached as encoded JPEG bytes, least recently used first out, up to this many bytes.
DEFAULT_THUMBNAIL_CACHE_BYTES = 64 * 2**20
# A class-filtered search first asks the index for this many times k results, then 4x more each time
# until k of the class are found (or the whole gallery has been ranked).
_FILTER_DEPTH_FACTOR = 4
_FILTER_MIN_DEPTH = 64


# --------------------------------------------------------------------------------------------------
# Loading


# --------------------------------------------------------------------------------------------------
# Decoding uploads


def decode_upload(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An uploaded image as RGB, decoded in memory with the checks of ``vitp features`` (nothing is
    written to disk); only the formats of UPLOAD_FORMATS may reach Pillow's decoders."""
    try:
        return decode_image(io.BytesIO(data), name, max_pixels, formats=UPLOAD_FORMATS, empty=not data)
    except ImageError as err:
        raise ServeError(str(err), UPLOAD_STATUS.get(err.kind, 400)) from None


# --------------------------------------------------------------------------------------------------
# Search


@dataclass
class Hit:
    rank: int
    id: int  # the gallery row (FAISS id)
    path: str
    label: str
    score: float


@dataclass
class SearchOutcome:
    hits: list[Hit]
    embed_ms: float
    search_ms: float


class SearchEngine:
    """Embeds query images with the gallery's ViT and searches the index."""

    def __init__(
        self,
        index: RetrievalIndex,
        feature_model: FeatureModel,
        *,
        max_pixels: int | None = None,
        thumbnail_cache_bytes: int = DEFAULT_THUMBNAIL_CACHE_BYTES,
    ):
        settings = index.feature_settings or {}
        self.index = index
        self.feature_model = feature_model
        self.max_pixels = max_pixels if max_pixels is not None else settings.get("max_pixels", DEFAULT_MAX_PIXELS)
        self.query_settings = extraction_settings(feature_model, settings["select_layer"], settings["pool"], self.max_pixels)
        self._transform = build_transform(feature_model.image_size)
        self.paths = [str(path) for path in index.image_paths]
        self.labels = [str(label) for label in index.labels]
        self.class_counts = dict(sorted(Counter(self.labels).items()))
        self._rows_of_class: dict[str, list[int]] = {label: [] for label in self.class_counts}
        for row, label in enumerate(self.labels):
            self._rows_of_class[label].append(row)
        self._id_of_path: dict[str, int] = {}
        for row, path in enumerate(self.paths):
            self._id_of_path.setdefault(path, row)
        # One forward (and one search) at a time: the ViT and torch already use every core for one
        # query; concurrent forwards would only compete for them. Decoding stays parallel, bounded
        # so that a burst of large uploads cannot hold unbounded decoded pixels in memory.
        self._compute_lock = threading.Lock()
        self._decode_slots = threading.BoundedSemaphore(max(2, os.cpu_count() or 1))
        # encoded JPEGs, least recently used dropped first once thumbnail_cache_bytes are held
        self._thumbnails = cachetools.LRUCache(maxsize=thumbnail_cache_bytes, getsizeof=len)
        self._thumbnails_lock = threading.Lock()  # cachetools' caches are not thread-safe
        # A first forward warms the model up and gives the query dimension to check against the index.
        warmup = self.embed(Image.new("RGB", (feature_model.image_size, feature_model.image_size)))
        index.check_queries(self.query_settings, len(warmup), f"queries embedded with {feature_model.checkpoint}")

    def __len__(self) -> int:
        return len(self.paths)

    def describe(self) -> dict[str, Any]:
        settings = self.query_settings
        return {
            "index": self.index.name,
            "index_type": self.index.describe(),
            "images": len(self),
            "classes": len(self.class_counts),
            "model": {
                "checkpoint": settings["vit_checkpoint"],
                "fingerprint": settings["model_fingerprint"],
                "layer": settings["layer"],
                "pool": settings["pool"],
                "image_size": settings["image_size"],
                "device": self.feature_model.device.type,
                "dtype": self.feature_model.dtype,
            },
        }

    # ---------------------------------------------------------------------------------------------
    # Gallery

    def gallery_id(self, path: str) -> int:
        """The row of a gallery path exactly as the index lists it (404 for anything else)."""
        row = self._id_of_path.get(path)
        if row is None:
            raise ServeError(f"{path!r} is not an image of this gallery", 404)
        return row

    def check_class(self, label: str | None) -> None:
        if label is not None and label not in self.class_counts:
            shown = ", ".join(list(self.class_counts)[:20]) + (", ..." if len(self.class_counts) > 20 else "")
            raise ServeError(f"class {label!r} is not in this gallery (classes: {shown})")

    def gallery_items(self, offset: int, limit: int, label: str | None = None) -> tuple[int, list[int]]:
        """(how many match, the rows offset..offset+limit of them) in index order."""
        self.check_class(label)
        rows = range(len(self)) if label is None else self._rows_of_class[label]
        return len(rows), list(rows[offset : offset + limit])

    def load_gallery_image(self, path: str) -> Image.Image:
        self.gallery_id(path)
        with self._decode_slots:
            try:
                return load_image(path, self.max_pixels)
            except ImageError as err:
                raise ServeError(f"gallery image {path} cannot be read: {err.reason}", 404) from None

    def thumbnail(self, path: str, size: int) -> bytes:
        """A JPEG at most ``size`` pixels on its longer side, of a gallery image only."""
        self.gallery_id(path)
        try:
            stat = os.stat(path)
        except OSError as err:
            raise ServeError(f"gallery image {path} cannot be read: {err.strerror or err}", 404) from None
        key = (path, size, stat.st_mtime_ns, stat.st_size)  # a replaced file is drawn again
        with self._thumbnails_lock:
            data = self._thumbnails.get(key)
        if data is None:
            image = self.load_gallery_image(path)
            image.thumbnail((size, size), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=THUMBNAIL_QUALITY)
            data = buffer.getvalue()
            if len(data) <= self._thumbnails.maxsize:  # a larger one is served but never cached
                with self._thumbnails_lock:
                    self._thumbnails[key] = data
        return data

    # ---------------------------------------------------------------------------------------------
    # Queries

    def decode_upload(self, data: bytes, name: str) -> Image.Image:
        with self._decode_slots:
            return decode_upload(data, name, self.max_pixels)

    def embed(self, image: Image.Image) -> np.ndarray:
        """The image's feature vector, as `vitp features` computes it for gallery images."""
        pixels = self._transform(image).unsqueeze(0)
        with self._compute_lock:
            pixels = pixels.to(self.feature_model.device)
            layer, pool = self.query_settings["layer"], self.query_settings["pool"]
            return embed_batch(self.feature_model.model, pixels, layer, pool)[0].cpu().numpy()

    def search_image(self, image: Image.Image, k: int, label: str | None = None, exclude_id: int | None = None) -> SearchOutcome:
        started = time.perf_counter()
        vector = self.embed(image)
        embedded = time.perf_counter()
        hits = self.search_vector(vector, k, label, exclude_id)
        return SearchOutcome(hits, (embedded - started) * 1000, (time.perf_counter() - embedded) * 1000)

    def search_vector(self, vector: np.ndarray, k: int, label: str | None = None, exclude_id: int | None = None) -> list[Hit]:
        """The top-k gallery images for a feature vector; of class ``label`` only when given;
        never the gallery row ``exclude_id`` (the query itself, when it comes from the gallery)."""
        self.check_class(label)
        query = self.index.prepare_queries(vector[None, :])
        exclude = None if exclude_id is None else np.array([exclude_id], dtype=np.int64)
        depth = k if label is None else max(k * _FILTER_DEPTH_FACTOR, _FILTER_MIN_DEPTH)
        while True:
            depth = min(depth, len(self))
            with self._compute_lock:
                scores, ids, _ = self.index.search(query, depth, exclude=exclude)
            found = [
                (int(row), float(score))
                for row, score in zip(ids[0], scores[0])
                if row >= 0 and (label is None or self.labels[row] == label)
            ]
            if len(found) >= k or depth >= len(self):
                break
            depth *= _FILTER_DEPTH_FACTOR
        return [
            Hit(rank, row, self.paths[row], self.labels[row], score)
            for rank, (row, score) in enumerate(found[:k], start=1)
        ]
