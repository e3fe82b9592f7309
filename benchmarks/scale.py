"""Retrieval beyond one process, in one run: extraction with 2 torchrun ranks against 1 process, and a
million-vector gallery indexed exactly (FAISS Flat), under a memory budget (autofaiss's rule) and in
Milvus Lite.

    python benchmarks/scale.py [--n 1000000] [--dim 256] [--queries 1000] [--images 256]
                               [--preset internvit-small] [--skip_extraction] [--skip_milvus]
                               [--milvus_index FLAT] [--max_query_ms MS] [--workdir DIR]

(a) Extraction: ``--images`` JPEGs (320x240, 4 class folders) embedded by a randomly initialised
    ``--preset`` ViT on the CPU, once by ``python -m vitp.cli features`` and once by ``torchrun
    --standalone --nproc_per_node 2 -m vitp.cli features`` (torchrun gives each rank one thread; the
    single process uses every core). Wall time of each command, the ratio, and whether the two
    outputs are the same.

(b) Index: ``--n`` x ``--dim`` synthetic clustered unit vectors written as an embedding store (shards
    of 100 000), and ``--queries`` held-out queries from the same distribution. The vectors are images
    of 1000 classes in a 32-dimensional latent space (class centre + spread 0.6), embedded by a random
    orthonormal map into ``--dim`` dimensions, plus 0.05 isotropic noise: features with a low
    intrinsic dimension and class clusters, as a ViT's are (not uniform noise, where nearest neighbours
    barely differ from the rest). Each index is built in a process of its own, read from the store:

    * Flat: FAISS IndexFlatIP, exact: the reference for recall;
    * budget: ``--max_index_memory`` = 1/4 of Flat's size: autofaiss's choice, trained on a sample,
      filled chunk by chunk, nprobe tuned to ``--max_query_ms`` (default: a tenth of Flat's time per
      query, measured just before: the goal below);
    * Milvus Lite: a ``--milvus_index`` collection (FLAT = exact) in a local file.

    Per index: build time; peak resident memory added by the build (VmHWM minus the resident memory
    just before it, the store's paths and labels already loaded) and the process's whole peak (for
    Milvus Lite, of the process and its server process, sampled every 0.2 s); size on disk;
    recall@10 of the queries against Flat's results; queries/s (k=10, all queries in one call, after a
    warm-up). Goals (issue 13): budgeted peak <= 1.3x its budget, recall@10 >= 0.90, queries/s >= 10x Flat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from peak_memory import reset_peak, status_kb

SHARD_ROWS = 100_000
LATENT, CLASSES, SPREAD, NOISE = 32, 1000, 0.6, 0.05


# --------------------------------------------------------------------------------------------------
# Memory


class TreePeak:
    """Peak RSS of this process and its children (Milvus Lite's server), sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for process in [self.process, *self.process.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except Exception:  # noqa: BLE001 - a process that just ended
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreePeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------
# (b) the synthetic gallery


def latent_model(dimension: int):
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((dimension, LATENT)))[0].astype(np.float32)
    centres = rng.standard_normal((CLASSES, LATENT)).astype(np.float32)
    return basis, centres


def sample(count: int, dimension: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    basis, centres = latent_model(dimension)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    latent = centres[labels] + SPREAD * rng.standard_normal((count, LATENT), dtype=np.float32)
    vectors = latent @ basis.T + NOISE * rng.standard_normal((count, dimension), dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), labels


def write_gallery(store: Path, count: int, dimension: int) -> None:
    from vitp.retrieval.embedding_store import shard_name, write_manifest, write_shard

    shards = []
    for number, start in enumerate(range(0, count, SHARD_ROWS)):
        rows = min(SHARD_ROWS, count - start)
        vectors, labels = sample(rows, dimension, seed=1000 + number)
        names = [f"c{label:04d}" for label in labels]
        paths = [f"/scale/{name}/{start + i:07d}.jpg" for i, name in enumerate(names)]
        write_shard(store, shard_name(number), vectors, paths, names, [0] * rows, [0] * rows, "float32")
        shards.append((shard_name(number), rows))
    settings = {"model_fingerprint": "sha256:synthetic", "layer": 24, "pool": "mean", "image_size": 448}
    write_manifest(store, settings, "float32", dimension, shards)


def build_child(args: argparse.Namespace) -> None:
    """One index, built in this process: prints one JSON line of measurements."""
    from vitp.retrieval.embedding_store import EmbeddingStore
    from vitp.retrieval.index import RetrievalIndex

    store = EmbeddingStore.open(args.store)
    queries = np.load(args.queries_file)
    reset_peak()
    before = status_kb("VmRSS") * 1024
    started = time.perf_counter()
    with TreePeak() as tree:
        if args.child == "flat":
            index = RetrievalIndex.build(store, "Flat", faiss_device="cpu", progress_bar=False)
        elif args.child == "budget":
            index = RetrievalIndex.build(store, max_index_memory=args.budget, max_query_ms=args.max_query_ms,
                                         faiss_device="cpu", progress_bar=False)
        else:
            index = RetrievalIndex.build(store, backend="milvus", uri=str(Path(args.index_dir) / "milvus.db"),
                                         collection="scale", index_type=args.milvus_index, progress_bar=False)
        build_seconds = time.perf_counter() - started
        peak = status_kb("VmHWM") * 1024
        index.save(args.index_dir)
    on_disk = sum(path.stat().st_size for path in Path(args.index_dir).rglob("*") if path.is_file())
    prepared = index.prepare_queries(queries)
    index.top_k(prepared[:10], 10)  # warm-up
    started = time.perf_counter()
    _, ids = index.top_k(prepared, 10)
    search_seconds = time.perf_counter() - started
    np.save(args.ids_out, ids)
    print(json.dumps({
        "index": index.describe(), "build_s": build_seconds, "peak_added": peak - before, "peak": peak,
        "tree_peak": tree.peak, "metadata_bytes": int(store.image_paths.nbytes + store.labels.nbytes),
        "on_disk": on_disk, "queries_per_s": len(queries) / search_seconds, "tuning": index.meta.get("tuning"),
    }))


def run_child(kind: str, work: Path, args: argparse.Namespace, budget: int = 0, max_query_ms: float = 10.0) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--store", str(work / "store"), "--queries_file",
               str(work / "queries.npy"), "--ids_out", str(work / f"{kind}_ids.npy"), "--index_dir",
               str(work / f"{kind}.index"), "--budget", str(budget), "--max_query_ms", str(max_query_ms),
               "--milvus_index", args.milvus_index]
    print(f"building {kind} ...", flush=True)
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["ids"] = np.load(work / f"{kind}_ids.npy")
    shutil.rmtree(work / f"{kind}.index", ignore_errors=True)
    return result


def index_benchmark(args: argparse.Namespace, work: Path) -> None:
    from vitp.retrieval.backends.autoindex import human_bytes, recall_at_k

    print(f"writing {args.n} x {args.dim} clustered vectors as an embedding store ...", flush=True)
    write_gallery(work / "store", args.n, args.dim)
    np.save(work / "queries.npy", sample(args.queries, args.dim, seed=7)[0])
    flat_bytes = args.n * args.dim * 4
    budget = flat_bytes // 4
    results = {"Flat (exact)": run_child("flat", work, args)}
    # The query-time target: a tenth of exact search's time per query here (the goal), unless given.
    max_query_ms = args.max_query_ms or 1000 / results["Flat (exact)"]["queries_per_s"] / 10
    results["budget (1/4 of Flat)"] = run_child("budget", work, args, budget, max_query_ms)
    if not args.skip_milvus:
        results[f"Milvus Lite {args.milvus_index}"] = run_child("milvus", work, args)
    exact = results["Flat (exact)"]["ids"]
    flat_rate = results["Flat (exact)"]["queries_per_s"]

    print(f"\n{args.n} x {args.dim} float32 vectors (Flat index {human_bytes(flat_bytes)}; budget {human_bytes(budget)}, tuned to "
          f"{max_query_ms:.2f} ms per query), {args.queries} queries, k=10; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'':<22}{'build':>9}{'peak added':>12}{'peak':>11}{'on disk':>10}{'recall@10':>11}{'queries/s':>11}{'vs Flat':>9}")
    for name, r in results.items():
        peak = r["tree_peak"] if "Milvus" in name else r["peak"]
        print(f"{name:<22}{r['build_s']:>8.1f}s{human_bytes(r['peak_added']):>12}{human_bytes(peak):>11}{human_bytes(r['on_disk']):>10}"
              f"{recall_at_k(r['ids'], exact):>11.4f}{r['queries_per_s']:>11.1f}{r['queries_per_s'] / flat_rate:>8.1f}x")
    for name, r in results.items():
        print(f"  {name}: {r['index']}" + (f"; build's own report: {r['tuning']}" if r.get("tuning") else ""))
    budgeted = results["budget (1/4 of Flat)"]
    print(f"the store's paths and labels, loaded before each build: {human_bytes(budgeted['metadata_bytes'])}")
    print(f"goals: budgeted peak added {budgeted['peak_added'] / budget:.2f}x its budget (<= 1.3), "
          f"recall@10 {recall_at_k(budgeted['ids'], exact):.4f} (>= 0.90), "
          f"queries/s {budgeted['queries_per_s'] / flat_rate:.1f}x Flat (>= 10)")


# --------------------------------------------------------------------------------------------------
# (a) extraction, 2 ranks against 1


def make_images(root: Path, count: int) -> None:
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8))
        x, y = (int(v) for v in rng.integers(0, 200, 2))
        ImageDraw.Draw(image).ellipse([x, y, x + 120, y + 90], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        image.save(folder / f"img{i:05d}.jpg", quality=90)


def extraction_benchmark(args: argparse.Namespace, work: Path) -> None:
    from vitp import build_vit, save_vit

    make_images(work / "images", args.images)
    save_vit(build_vit(args.preset).eval(), work / "vit.safetensors")
    common = ["features", "--image_dir", str(work / "images"), "--vit_checkpoint", str(work / "vit.safetensors"),
              "--device", "cpu", "--dtype", "fp32", "--batch_size", "16", "--num_workers", "0", "--no_progress"]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    runs = {
        "1 process": [sys.executable, "-m", "vitp.cli", *common, "--output", str(work / "one.npz")],
        "2 torchrun ranks": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "vitp.cli", *common, "--output", str(work / "two.npz")],
    }
    seconds = {}
    for name, command in runs.items():
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=environment)
        seconds[name] = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    with np.load(work / "one.npz") as one, np.load(work / "two.npz") as two:
        same = bool(np.array_equal(one["image_paths"], two["image_paths"]))
        difference = float(np.abs(one["features"] - two["features"]).max())
    print(f"\n(a) extraction of {args.images} images with {args.preset} on the CPU ({os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}); wall time of the whole command, model loading included")
    for name, value in seconds.items():
        print(f"  {name:<18} {value:7.1f} s  {args.images / value:6.1f} images/s")
    print(f"  ratio 2 ranks / 1: {seconds['1 process'] / seconds['2 torchrun ranks']:.2f}x; same rows in the same "
          f"order: {same}, largest feature difference {difference:.1e}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--preset", default="internvit-small")
    parser.add_argument("--milvus_index", default="FLAT")
    parser.add_argument("--max_query_ms", type=float,
                        help="query-time target of the budgeted index (default: a tenth of Flat's time per query)")
    parser.add_argument("--skip_extraction", action="store_true")
    parser.add_argument("--skip_milvus", action="store_true")
    parser.add_argument("--workdir", help="where to write the images, store and indexes (default: a temporary folder)")
    # One index build in a process of its own (used by the run above).
    parser.add_argument("--child", choices=("flat", "budget", "milvus"), help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--queries_file", help=argparse.SUPPRESS)
    parser.add_argument("--ids_out", help=argparse.SUPPRESS)
    parser.add_argument("--index_dir", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        build_child(args)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitp-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if not args.skip_extraction:
            extraction_benchmark(args, work)
        index_benchmark(args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
