"""Load test of `vitp serve`: N parallel clients on loopback for a bounded time, per endpoint.

    python benchmarks/serve.py [--index IDX] [--clients 8] [--seconds 10] [--k 10]
                               [--endpoints search,gallery,thumbnail] [--model internvit-tiny]
                               [--gallery 200] [--classes 8] [--device cpu] [--max_requests 100000]

Starts `vitp serve --port 0` as a separate process on 127.0.0.1 (the clients and the server share
this machine's cores, as they would on one workstation). Without --index, a synthetic gallery is
made first: --gallery images in --classes class folders, a randomly initialised --model ViT, its
features and a Flat index, all in a temporary directory.

Each endpoint is loaded for --seconds (and at most --max_requests requests) by --clients threads,
each with its own keep-alive connection, sending requests back to back:

* search     POST /api/search: a query image upload (decode + ViT forward + top-K search)
* gallery    GET /api/search/gallery: a gallery image as the query (read from disk + forward + search)
* thumbnail  GET /api/thumbnail: a gallery thumbnail (JPEG, cached by the server after its first request)

Printed per endpoint: requests, requests/s, p50/p95/p99/max latency and the error count (any answer
other than 200, or no answer). The target is zero errors.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ENDPOINTS = ("search", "gallery", "thumbnail")


# --------------------------------------------------------------------------------------------------
# A synthetic gallery


def make_images(root: Path, count: int, classes: int, seed: int) -> list[Path]:
    """Class c: a colour and stripe period of its own, with noise; 96x80 PNGs."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        label = i % classes
        colour = np.array([(label * 67) % 256, (label * 151 + 40) % 256, (label * 23 + 90) % 256], dtype=np.float32)
        period = 4 + label % 7
        pixels = rng.normal(0, 30, (80, 96, 3)) + colour
        pixels[:, (np.arange(96) // period) % 2 == 0] *= 0.5
        folder = root / f"class_{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img_{i:05d}.png"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def build_index(work: Path, args: argparse.Namespace) -> tuple[Path, list[Path]]:
    import torch

    from vitp import build_vit, save_vit
    from vitp.retrieval.extract import extract_features
    from vitp.retrieval.feature_file import load_features
    from vitp.retrieval.index import RetrievalIndex

    started = time.perf_counter()
    make_images(work / "gallery", args.gallery, args.classes, seed=0)
    queries = make_images(work / "queries", min(args.gallery, 32), args.classes, seed=1)
    torch.manual_seed(0)
    save_vit(build_vit(args.model).eval(), work / "vit.safetensors", to="vitp")
    extract_features(work / "gallery", work / "gallery.npz", work / "vit.safetensors", device=args.device,
                     num_workers=0, progress_bar=False)
    RetrievalIndex.build(load_features(work / "gallery.npz"), progress_bar=False).save(work / "gallery.index")
    print(f"built a synthetic index: {args.gallery} images, {args.classes} classes, {args.model} "
          f"({time.perf_counter() - started:.1f} s)")
    return work / "gallery.index", queries


# --------------------------------------------------------------------------------------------------
# The server


class Server:
    def __init__(self, index: Path, device: str):
        environment = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
        command = [sys.executable, "-m", "vitp.cli", "serve", "--index", str(index), "--port", "0",
                   "--device", device, "--no_access_log"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=environment)
        self.url = None
        for line in self.process.stdout:
            match = re.match(r"open (http://\S+) ", line)
            if match:
                self.url = match.group(1)
                break
            print(f"  server: {line.rstrip()}")
        if self.url is None:
            raise SystemExit(f"vitp serve did not start (exit code {self.process.wait()})")
        # Keep draining the server's output so that it never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.process.stdout], daemon=True).start()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


# --------------------------------------------------------------------------------------------------
# Clients


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, seconds: float, error: str | None) -> None:
        with self.lock:
            self.latencies.append(seconds)
            if error:
                self.errors.append(error)


def request_maker(endpoint: str, queries: list[bytes], gallery_paths: list[str], k: int):
    """(client, i) -> response of the i-th request of this endpoint."""
    if endpoint == "search":
        return lambda client, i: client.post(
            "/api/search", params={"k": k}, files={"image": (f"q{i}.png", queries[i % len(queries)], "image/png")}
        )
    if endpoint == "gallery":
        return lambda client, i: client.get(
            "/api/search/gallery", params={"path": gallery_paths[i % len(gallery_paths)], "k": k}
        )
    return lambda client, i: client.get("/api/thumbnail", params={"path": gallery_paths[i % len(gallery_paths)]})


def run_clients(url: str, send, clients: int, seconds: float, max_requests: int) -> tuple[Tally, float]:
    tally = Tally()
    counter = iter(range(max_requests))  # shared: the total number of requests is bounded
    counter_lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def next_number() -> int | None:
        with counter_lock:
            return next(counter, None)

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
            while time.perf_counter() < deadline and (number := next_number()) is not None:
                started = time.perf_counter()
                try:
                    response = send(client, number)
                    error = None if response.status_code == 200 else f"{response.status_code}: {response.text[:200]}"
                except httpx.HTTPError as err:
                    error = f"{type(err).__name__}: {err}"
                tally.add(time.perf_counter() - started, error)

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally, time.perf_counter() - started


def report(endpoint: str, tally: Tally, elapsed: float, clients: int) -> None:
    latencies = np.array(tally.latencies) * 1000
    count = len(latencies)
    if not count:
        print(f"{endpoint:<10} no request completed")
        return
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    print(f"{endpoint:<10} {clients:>3} clients  {count:>7} requests in {elapsed:5.1f} s  {count / elapsed:8.1f} req/s  "
          f"p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  p99 {p99:7.1f} ms  max {latencies.max():7.1f} ms  "
          f"errors {len(tally.errors)}")
    for error in sorted(set(tally.errors))[:5]:
        print(f"           error: {error}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", help="an existing index (default: build a synthetic one)")
    parser.add_argument("--queries", help="folder of query images for the search endpoint (default: the synthetic ones)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0, help="per endpoint")
    parser.add_argument("--max_requests", type=int, default=100_000, help="per endpoint")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--endpoints", default=",".join(ENDPOINTS), help=f"comma-separated: {', '.join(ENDPOINTS)}")
    parser.add_argument("--model", default="internvit-tiny", help="ViT preset of the synthetic index")
    parser.add_argument("--gallery", type=int, default=200, help="images in the synthetic gallery")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--device", default="cpu", help="where the server runs the ViT")
    args = parser.parse_args()
    endpoints = [name.strip() for name in args.endpoints.split(",") if name.strip()]
    unknown = set(endpoints) - set(ENDPOINTS)
    if unknown:
        parser.error(f"--endpoints: unknown {', '.join(sorted(unknown))}")

    with tempfile.TemporaryDirectory(prefix="vitp-serve-bench-") as temporary:
        if args.index:
            index = Path(args.index)
            query_dir = Path(args.queries) if args.queries else None
            queries = sorted(p for p in query_dir.rglob("*") if p.is_file())[:64] if query_dir else []
        else:
            index, queries = build_index(Path(temporary), args)
        server = Server(index, args.device)
        try:
            with httpx.Client(base_url=server.url, timeout=60, trust_env=False) as client:
                health = client.get("/api/health").json()
                gallery_paths = [item["path"] for item in client.get("/api/gallery", params={"limit": 500}).json()["items"]]
            if not queries:  # an existing index without --queries: its own gallery files are the uploads
                queries = [Path(path) for path in gallery_paths[:64]]
            query_bytes = [path.read_bytes() for path in queries]
            print(f"server {server.url}: {health['images']} images, {health['index_type']}, ViT on "
                  f"{health['model']['device']} ({health['model']['dtype']}, {health['model']['image_size']} px); "
                  f"this machine: {os.cpu_count()} CPUs shared by server and clients")
            for endpoint in endpoints:
                send = request_maker(endpoint, query_bytes, gallery_paths, args.k)
                run_clients(server.url, send, 1, 1.0, 20)  # warm-up: first forwards, thumbnail cache
                tally, elapsed = run_clients(server.url, send, args.clients, args.seconds, args.max_requests)
                report(endpoint, tally, elapsed, args.clients)
        finally:
            code = server.stop()
            print(f"server stopped (exit code {code})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
