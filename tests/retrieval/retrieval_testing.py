"""Helpers of the retrieval tests (a module with a unique name, importable from the tests; the fixtures
in conftest.py use it): images of coloured shapes and textures in class folders, and a bootstrap written
one resample at a time from the definition in the docstring of vitp.retrieval.statistics."""

import math
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


def percentile(samples, q):
    """Linear interpolation between order statistics (numpy's default 'linear' method), by hand."""
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (position - below) * (ordered[above] - ordered[below])


def draw(u, size):
    return min(int(u * size), size - 1)


def naive_bootstrap(metrics, classes, resamples, seed, confidence=0.95):
    """One resample at a time, one query at a time: micro from all queries, class-balanced and per
    class from each class's own queries (slot j takes a random member of query j's class)."""
    micro_rng, macro_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    n = len(classes)
    names = sorted(set(classes))
    members = {c: [j for j in range(n) if classes[j] == c] for c in names}
    micro = {m: [] for m in metrics}
    balanced = {m: [] for m in metrics}
    per_class = {c: {m: [] for m in metrics} for c in names}
    for _ in range(resamples):
        u = micro_rng.random(n)
        picked = [draw(u[j], n) for j in range(n)]
        for m, values in metrics.items():
            micro[m].append(sum(values[i] for i in picked) / n)
    for _ in range(resamples):
        u = macro_rng.random(n)
        picked = [members[classes[j]][draw(u[j], len(members[classes[j]]))] for j in range(n)]
        for m, values in metrics.items():
            means = []
            for c in names:
                slots = [picked[j] for j in range(n) if classes[j] == c]
                means.append(sum(values[i] for i in slots) / len(slots))
                per_class[c][m].append(means[-1])
            balanced[m].append(sum(means) / len(means))
    tails = ((1 - confidence) / 2, 1 - (1 - confidence) / 2)
    return {
        "micro": {m: [percentile(micro[m], q) for q in tails] for m in metrics},
        "class_balanced": {m: [percentile(balanced[m], q) for q in tails] for m in metrics},
        "per_class": {c: {m: [percentile(per_class[c][m], q) for q in tails] for m in metrics} for c in names},
    }
