"""Images for the retrieval tests: coloured shapes and textures in class folders (a module with a unique
name, importable from the tests; the fixtures in conftest.py use it)."""

from pathlib import Path

import numpy as np

from vitp_testing import draw_shape

CLASSES = {
    # class: (colour, shape)
    "disk": ((220, 40, 40), "ellipse"),
    "square": ((40, 180, 60), "rectangle"),
    "stripes": ((50, 70, 220), "stripes"),
}


def make_image_tree(root: Path, per_class: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for name, (colour, kind) in CLASSES.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{name}_{i:02d}.png"
            draw_shape(kind, colour, rng, size=(48, 40), extent=24).save(path)
            paths.append(path)
    return paths
