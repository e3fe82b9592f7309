"""Images for the retrieval tests: coloured shapes and textures in class folders (a module with a unique
name, importable from the tests; the fixtures in conftest.py use it)."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = {
    # class: (colour, shape)
    "disk": ((220, 40, 40), "ellipse"),
    "square": ((40, 180, 60), "rectangle"),
    "stripes": ((50, 70, 220), "stripes"),
}


def draw_image(kind: str, colour: tuple[int, int, int], rng: np.random.Generator, size=(48, 40)) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(0, 70, 3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(0, 16, 2))
    if kind == "ellipse":
        draw.ellipse([x, y, x + 24, y + 22], fill=colour)
    elif kind == "rectangle":
        draw.rectangle([x, y, x + 22, y + 20], fill=colour)
    else:
        for stripe in range(0, size[0], 8):
            draw.rectangle([stripe + x % 4, 0, stripe + x % 4 + 3, size[1]], fill=colour)
    return image


def make_image_tree(root: Path, per_class: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for name, (colour, kind) in CLASSES.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            path = folder / f"{name}_{i:02d}.png"
            draw_image(kind, colour, rng).save(path)
            paths.append(path)
    return paths
