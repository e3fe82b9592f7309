"""What the demo's numbers say: paired comparisons, the verdict, run-to-run spread, the machine.

The verdict follows the intervals, never the point values alone: ViTP is "ahead" of a baseline on
a metric only where the paired-bootstrap interval of ViTP - baseline excludes zero, "behind" only
where it lies below zero, and otherwise there is "no measurable difference". Classes where a
baseline scores higher are named, whether or not that difference is measurable.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitp.demo.settings import DemoSettings
from vitp.retrieval.evaluate import EvaluationReport
from vitp.retrieval.feature_file import FeatureSet
from vitp.retrieval.statistics import AHEAD, BEHIND, NO_DIFFERENCE, Comparison, compare

BOOTSTRAP_RESAMPLES = 1000
AVERAGES = (("micro", "micro"), ("class_balanced", "class-balanced"))


@dataclass
class MethodResult:
    method: str  # "vitp", "random", "histogram"
    title: str
    report: EvaluationReport
    queries: FeatureSet
    gallery: FeatureSet

    def value(self, average: str, metric: str) -> float:
        """A metric's micro or class-balanced value."""
        if average == "micro":
            return float(self.report.per_query.metrics[metric].mean())
        return self.report.class_balanced[metric]


def compare_methods(a: MethodResult, b: MethodResult, seed: int, name_a: str | None = None,
                    name_b: str | None = None) -> Comparison:
    """a - b on the shared query tiles, paired by path."""
    return compare(a.report.per_query, b.report.per_query, BOOTSTRAP_RESAMPLES, seed,
                   name_a=name_a or a.method, name_b=name_b or b.method)


def verdict_sentence(comparison: Comparison, baseline_name: str) -> str:
    """'Against <baseline>: ahead on ...; no measurable difference on ...; behind on ...'."""
    groups: dict[str, list[str]] = {AHEAD: [], NO_DIFFERENCE: [], BEHIND: []}
    for average, label in AVERAGES:
        for metric, interval in getattr(comparison.differences, average).items():
            groups[interval.verdict].append(f"{label} {metric}")
    words = {AHEAD: "ViTP ahead", NO_DIFFERENCE: "no measurable difference", BEHIND: "ViTP behind"}
    parts = [f"{words[verdict]} on {', '.join(items)}" for verdict, items in groups.items() if items]
    return f"Against the {baseline_name}: " + "; ".join(parts) + "."


def baseline_wins_sentence(comparison: Comparison, baseline_name: str) -> str:
    """The classes where the baseline scores higher on Top-1 or mAP (point values), and whether the
    paired interval of that class's difference says it is measurable."""
    wins: dict[str, list[str]] = {}
    for metric in ("Top-1", "mAP"):
        for name in comparison.classes_where_b_wins(metric):
            measurable = comparison.differences.per_class[name][metric].verdict != NO_DIFFERENCE
            wins.setdefault(name, []).append(f"{metric} {'measurably' if measurable else 'within noise'}")
    if not wins:
        return f"The {baseline_name} is not higher than ViTP in any class on Top-1 or mAP."
    return (f"Classes where the {baseline_name} scores higher than ViTP: "
            + "; ".join(f"{name} ({', '.join(metrics)})" for name, metrics in wins.items()) + ".")


def headline(comparisons: dict[str, Comparison], names: dict[str, str]) -> str:
    """The report's first sentence: class-balanced mAP against each baseline, by its interval."""
    random = comparisons["random"]
    outcome = {AHEAD: "Pretraining helped", NO_DIFFERENCE: "Pretraining made no measurable difference",
               BEHIND: "Pretraining hurt"}[random.differences.class_balanced["mAP"].verdict]
    parts = []
    for method, comparison in comparisons.items():
        diff = comparison.differences.class_balanced["mAP"]
        word = {AHEAD: "ahead of", NO_DIFFERENCE: "not measurably different from", BEHIND: "behind"}[diff.verdict]
        parts.append(f"{word} the {names[method]} ({comparison.a['class_balanced']['mAP']:.3f} vs "
                     f"{comparison.b['class_balanced']['mAP']:.3f}, difference {diff.format(3, signed=True)})")
    return f"{outcome}: on class-balanced mAP the pretrained ViT is " + " and ".join(parts) + "."


def seed_spread(per_seed: list[MethodResult]) -> dict[str, dict[str, tuple[float, float]]]:
    """average -> metric -> (mean, sample std) over the runs of one method with different seeds."""
    spread: dict[str, dict[str, tuple[float, float]]] = {}
    for average, _ in AVERAGES:
        for metric in per_seed[0].report.per_query.metrics:
            values = np.array([result.value(average, metric) for result in per_seed])
            std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            spread.setdefault(average, {})[metric] = (float(values.mean()), std)
    return spread


def machine_info() -> dict[str, Any]:
    """What the wall-clock times were measured on."""
    import torch

    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def machine_sentence(machine: dict[str, Any]) -> str:
    load = machine.get("load_average_at_start")
    load_text = f"; load average {load[0]:.1f} when the run started (other work slows it down)" if load else ""
    return (f"{machine['cpu']}, {machine['cpus_available']} of {machine['logical_cpus']} CPUs available, torch "
            f"{machine['torch']} on {machine['torch_threads']} threads, Python {machine['python']}, "
            f"{machine['platform']}{load_text}.")


@dataclass
class StepResult:
    """Retrieval with the ViT of one checkpoint of the main run."""

    step: int
    vitp: MethodResult
    versus_histogram: Comparison
    versus_random: Comparison


@dataclass
class VariantResult:
    """One variant of an ablation: its runs (one per seed) and, for all but the reference, the
    paired comparison of its ViT with the reference's (first seed)."""

    variant: Any  # vitp.demo.ablation.Variant
    runs: list[Any]  # vitp.demo.run.RunResult
    versus_reference: Comparison | None = None


@dataclass
class DemoResults:
    settings: DemoSettings
    quick: bool
    machine: dict[str, Any]
    summary: dict[str, Any]  # the data set
    methods: list[MethodResult]  # ViTP, random init, histogram of the main run
    comparisons: dict[str, Comparison]  # baseline -> ViTP - baseline
    main_run: Any  # vitp.demo.run.RunResult
    seed_runs: list[Any]  # runs of the main settings with every seed (empty for one seed)
    ablation: str | None
    variants: list[VariantResult]
    steps: list[StepResult]
    seconds: float
    command: str = "vitp demo"
    pixels: Any = None  # vitp.demo.pixel_task.PixelResults with --tasks retrieval,pixels

    def method(self, name: str) -> MethodResult:
        return next(m for m in self.methods if m.method == name)

    def seed_spreads(self) -> dict[str, dict]:
        """method -> average -> metric -> (mean, std) over the seeds."""
        if not self.seed_runs:
            return {}
        return {"vitp": seed_spread([r.vitp for r in self.seed_runs]),
                "random": seed_spread([r.random for r in self.seed_runs])}

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        def run_dict(run: Any) -> dict[str, Any]:
            return {"seed": run.seed, "directory": str(run.directory), "train_seconds": round(run.train_seconds, 1),
                    "reused": run.reused, "settings": dataclasses.asdict(run.settings),
                    "vitp": method_dict(run.vitp), "random": method_dict(run.random)}

        return {
            "settings": dataclasses.asdict(self.settings),
            "seed": self.settings.seed,
            "quick": self.quick,
            "command": self.command,
            "machine": self.machine,
            "seconds": round(self.seconds, 1),
            "data": self.summary,
            "methods": {m.method: method_dict(m) for m in self.methods},
            "comparisons": {name: c.to_dict() for name, c in self.comparisons.items()},
            "main_run": run_dict(self.main_run),
            "seeds": {
                "runs": [run_dict(r) for r in self.seed_runs],
                "spread": {m: {a: {k: {"mean": v[0], "std": v[1]} for k, v in row.items()} for a, row in spread.items()}
                           for m, spread in self.seed_spreads().items()},
            },
            "ablation": None if not self.ablation else {
                "name": self.ablation,
                "variants": [{
                    "label": v.variant.label, "description": v.variant.description, "changes": v.variant.changes,
                    "paper_rsar_map": v.variant.paper, "runs": [run_dict(r) for r in v.runs],
                    "versus_reference": v.versus_reference.to_dict() if v.versus_reference else None,
                } for v in self.variants],
            },
            "steps": [{"step": s.step, "vitp": method_dict(s.vitp), "versus_histogram": s.versus_histogram.to_dict(),
                       "versus_random": s.versus_random.to_dict()} for s in self.steps],
            "pixels": self.pixels.to_dict() if self.pixels is not None else None,
        }


def method_dict(result: MethodResult) -> dict[str, Any]:
    """A method's numbers without the per-query lists (those are in evaluation/<method>.json)."""
    report = result.report
    return {
        "title": result.title,
        "micro": {m: float(v.mean()) for m, v in report.per_query.metrics.items()},
        "class_balanced": report.class_balanced,
        "intervals": report.intervals.to_dict() if report.intervals else None,
        "per_class": report.per_class,
    }
