"""The colour-histogram baseline of the demo: a strong feature for classes that colour defines.

A joint RGB histogram (8 bins per channel, 512 bins) of each tile, square-rooted (the Hellinger
kernel, which suits histograms better than raw counts under a dot product) and L2-normalised, so
that the same FAISS inner-product search and metrics apply as for ViT features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vitp.data.images import load_image
from vitp.retrieval.extract.reader import list_images
from vitp.retrieval.feature_file import FeatureSet, labels_from_paths, save_features

BINS = 8


def colour_histogram(pixels: np.ndarray, bins: int = BINS) -> np.ndarray:
    """(H, W, 3) uint8 -> (bins³,) float32 Hellinger-normalised joint histogram."""
    quantised = (pixels.reshape(-1, 3).astype(np.int64) * bins) // 256
    codes = (quantised[:, 0] * bins + quantised[:, 1]) * bins + quantised[:, 2]
    counts = np.bincount(codes, minlength=bins**3).astype(np.float32)
    root = np.sqrt(counts / counts.sum())
    return root / np.linalg.norm(root)


def histogram_features(image_dir: str | Path, output: str | Path) -> FeatureSet:
    paths = list_images(image_dir)  # as `vitp features` lists them, so the methods' queries pair up
    features = np.stack([colour_histogram(np.asarray(load_image(path))) for path in paths])
    image_paths = np.array([str(path) for path in paths])
    feature_set = FeatureSet(
        features=features,
        image_paths=image_paths,
        labels=labels_from_paths(image_paths),
        settings={"model_fingerprint": f"rgb-histogram-{BINS}x{BINS}x{BINS}-hellinger", "layer": None,
                  "pool": "histogram", "image_size": None},
        source=str(output),
    )
    save_features(feature_set, output)
    return feature_set
