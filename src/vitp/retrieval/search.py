"""``vitp search``: the top-K gallery images for query images (a file or a folder) or query features.

Query images are embedded with the model and settings recorded in the index (the checkpoint path
can be overridden if the file moved); the model's fingerprint must match the index's, so a query is
never compared with features of another model. Results are printed and written as JSON or CSV, and
optionally drawn as a contact sheet.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import vitp
from vitp.data.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, iter_image_files
from vitp.errors import RetrievalError
from vitp.files import atomic_path
from vitp.retrieval.extract.embedder import FeatureModel, load_feature_model
from vitp.retrieval.extract.run import embed_files
from vitp.retrieval.feature_file import FeatureSet
from vitp.retrieval.index import RetrievalIndex, count_short_results
from vitp.retrieval.pictures import SheetRow, write_contact_sheet

logger = logging.getLogger("vitp")

OUTPUT_FORMATS = (".json", ".csv")


def output_format(path: Path | str) -> str:
    """The results format of an output file, by its suffix: ``.json`` or ``.csv``."""
    suffix = Path(path).suffix.lower()
    if suffix not in OUTPUT_FORMATS:
        raise RetrievalError(f"output {path}: unknown format; use a name ending in {' or '.join(OUTPUT_FORMATS)}")
    return suffix


@dataclass
class SearchResults:
    index_path: str
    k: int
    query_paths: list[str]
    query_labels: list[str]
    scores: np.ndarray  # [n, k]
    ids: np.ndarray  # [n, k], -1 where the gallery has fewer than k images
    gallery_paths: np.ndarray
    gallery_labels: np.ndarray
    skipped: list[tuple[str, str]]  # query files that could not be read
    query_expansion: dict[str, Any] | None

    def rows(self) -> list[dict[str, Any]]:
        out = []
        for i, query in enumerate(self.query_paths):
            results = [
                {"rank": r + 1, "path": str(self.gallery_paths[j]), "label": str(self.gallery_labels[j]), "score": float(s)}
                for r, (j, s) in enumerate(zip(self.ids[i], self.scores[i]))
                if j >= 0
            ]
            out.append({"query": query, "query_label": self.query_labels[i], "results": results})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index_path,
            "k": self.k,
            "query_expansion": self.query_expansion,
            "queries": self.rows(),
            "skipped_queries": [{"path": p, "reason": r} for p, r in self.skipped],
        }

    def write(self, path: Path) -> Path:
        """JSON (everything) or CSV (one line per query and rank), by the file's suffix; atomically."""
        path = Path(path)
        if output_format(path) == ".json":
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        else:
            buffer = io.StringIO()
            writer = csv.writer(buffer)
            writer.writerow(["query", "query_label", "rank", "path", "label", "score"])
            for row in self.rows():
                for result in row["results"]:
                    writer.writerow([row["query"], row["query_label"], result["rank"], result["path"],
                                     result["label"], f"{result['score']:.6f}"])
            text = buffer.getvalue()
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return path

    def lines(self, limit: int, written: bool = False) -> list[str]:
        """The first ``limit`` queries and their results; ``written``: all of them go to output files."""
        out = []
        shown = self.rows()[:limit]
        # one label column for every query shown, as wide as its longest label
        width = max((len(result["label"]) for row in shown for result in row["results"]), default=0)
        for row in shown:
            out.append(f"query {row['query']}")
            for result in row["results"]:
                out.append(f"  {result['rank']:>3}  {result['score']:.4f}  {result['label']:<{width}}  {result['path']}")
        if len(self.query_paths) > limit:
            where = "all of them are in the output files" if written else "no output file holds them"
            out.append(f"... {len(self.query_paths) - limit} more queries ({where})")
        return out

    def contact_sheet(self, path: Path, limit: int, thumbnail: int = 128) -> Path:
        """The first ``limit`` queries drawn with their results (see :func:`write_contact_sheet`)."""
        known = set(map(str, self.gallery_labels))
        rows = [
            SheetRow(
                row["query"],
                row["query_label"] if row["query_label"] in known else None,  # colour only comparable classes
                [(r["path"], r["label"], r["score"]) for r in row["results"]],
            )
            for row in self.rows()[:limit]
        ]
        return write_contact_sheet(rows, Path(path), thumbnail)


def query_files(image: str | Path) -> list[Path]:
    """A single image file, or every image under a folder (recursively, sorted)."""
    image = Path(image)
    if image.is_dir():
        files = [Path(os.path.abspath(path)) for path in iter_image_files(image)]
        if not files:
            raise RetrievalError(f"image {image}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return files
    if not image.exists():
        raise RetrievalError(f"image {image}: no such file or directory")
    return [Path(os.path.abspath(image))]


def load_index_model(
    index: RetrievalIndex, vit_checkpoint: str | Path | None = None, device: str = "auto", dtype: str | None = None
) -> FeatureModel:
    """The ViT recorded in the index's feature settings, configured as it was for the gallery."""
    settings = index.feature_settings
    if not settings or "vit_checkpoint" not in settings:
        raise RetrievalError(
            f"{index.name} was built from features without vitp settings (the seed's .npz?), so the model that "
            f"made them is unknown; extract gallery and query features with `vitp features`"
        )
    checkpoint = Path(vit_checkpoint or settings["vit_checkpoint"])
    if not checkpoint.exists():
        raise RetrievalError(
            f"the index's gallery was embedded with {settings['vit_checkpoint']}, which no longer exists; "
            f"pass its new location with vit_checkpoint"
        )
    config = vitp.VisionConfig.from_dict(settings["model_config"]) if settings.get("model_config") else None
    return load_feature_model(checkpoint, vit_config=config, device=device, dtype=dtype or settings.get("dtype", "auto"))


def embed_queries(
    index: RetrievalIndex,
    image: str | Path,
    *,
    vit_checkpoint: str | Path | None = None,
    device: str = "auto",
    dtype: str | None = None,
    batch_size: int = 32,
    num_workers: int | None = None,
    progress_bar: bool = True,
) -> tuple[FeatureSet | None, list[tuple[str, str]]]:
    """Embed query images exactly like the gallery: same checkpoint, config, layer, pooling, size."""
    settings = index.feature_settings
    feature_model = load_index_model(index, vit_checkpoint, device, dtype)
    checkpoint = feature_model.checkpoint
    queries, skipped = embed_files(
        feature_model,
        query_files(image),
        settings["select_layer"],
        settings["pool"],
        batch_size=batch_size,
        num_workers=num_workers,
        max_pixels=settings.get("max_pixels", DEFAULT_MAX_PIXELS),
        progress_bar=progress_bar,
    )
    if queries is not None:
        index.check_queries(queries.settings, queries.dimension, f"queries embedded with {checkpoint}")
    return queries, skipped


def _warn_about_short_results(index: RetrievalIndex, ids: np.ndarray, k: int) -> None:
    expected = min(k, len(index))
    short = count_short_results(ids, expected)
    if short:
        logger.warning(
            "%d of the %d queries got fewer than %d results: %s found fewer candidates than asked for (raise "
            "nprobe for an IVF index, ef_search for HNSW)", short, len(ids), expected, index.describe()
        )


def search_index(
    index: RetrievalIndex,
    queries: FeatureSet,
    k: int = 5,
    *,
    qe_k: int = 0,
    qe_alpha: float = 0.0,
    search_parameters: dict[str, Any] | None = None,
    skipped: list[tuple[str, str]] | None = None,
) -> SearchResults:
    """Top-k of each query (checked against the index's settings first)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    index.check_queries(queries.settings, queries.dimension, f"query features {queries.source}")
    if search_parameters:
        index.set_search_parameters(search_parameters)
    scores, ids, _ = index.search(index.prepare_queries(queries.features), k, qe_k=qe_k, qe_alpha=qe_alpha)
    _warn_about_short_results(index, ids, k)
    return SearchResults(
        index_path=index.name,
        k=k,
        query_paths=[str(p) for p in queries.image_paths],
        query_labels=[str(label) for label in queries.labels],
        scores=scores,
        ids=ids,
        gallery_paths=index.image_paths,
        gallery_labels=index.labels,
        skipped=skipped or [],
        query_expansion={"k": qe_k, "alpha": qe_alpha} if qe_k else None,
    )
