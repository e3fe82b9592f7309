"""Load an index and its ViT, and serve them over HTTP with uvicorn (`vitp serve`)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Callable

from vitp.errors import ConfigError
from vitp.retrieval.index import RetrievalIndex
from vitp.retrieval.search import load_index_model
from vitp.serve.app import DEFAULT_MAX_K, DEFAULT_MAX_UPLOAD_BYTES, create_app
from vitp.serve.engine import SearchEngine

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def load_engine(
    index_dir: str | Path,
    *,
    vit_checkpoint: str | Path | None = None,
    device: str = "auto",
    dtype: str | None = None,
    faiss_device: str = "auto",
    max_pixels: int | None = None,
) -> SearchEngine:
    """The index (FAISS or Milvus: whichever its directory names), and the ViT its gallery was embedded
    with (checked by fingerprint)."""
    index = RetrievalIndex.load(index_dir, faiss_device=faiss_device)
    feature_model = load_index_model(index, vit_checkpoint, device=device, dtype=dtype)
    return SearchEngine(index, feature_model, max_pixels=max_pixels)


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), not yet listening: a taken port is a clean error before
    anything slow happens, and ``port=0`` (any free port) can be reported."""
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise ConfigError(f"host {host}: cannot be resolved ({err.strerror})") from None
    sock = socket.socket(family, kind, protocol)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {err.strerror or err} (choose another port)") from None
    return sock


def _print_now(line: str) -> None:
    print(line, flush=True)  # a supervising process reads the URL as soon as it is printed


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def run_server(
    index_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    vit_checkpoint: str | Path | None = None,
    device: str = "auto",
    dtype: str | None = None,
    faiss_device: str = "auto",
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    max_pixels: int | None = None,
    max_k: int = DEFAULT_MAX_K,
    access_log: bool = True,
    announce: Callable[[str], None] | None = None,
) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM). ``announce`` gets the start-up lines (default: stdout)."""
    import uvicorn

    announce = announce or _print_now

    if max_upload_bytes < 1 or max_k < 1:
        raise ValueError(f"max_upload_bytes and max_k must be positive (got {max_upload_bytes} and {max_k})")
    if max_pixels is not None and max_pixels < 1:  # 0 would refuse every image as too large
        raise ValueError(f"max_pixels {max_pixels}: must be >= 1 (leave it out for the gallery's limit)")
    sock = bind_socket(host, port)  # first: a taken port is reported before minutes of model loading
    # Not listening until the model is loaded: meanwhile a client is refused instead of left waiting.
    try:
        engine = load_engine(index_dir, vit_checkpoint=vit_checkpoint, device=device, dtype=dtype,
                             faiss_device=faiss_device, max_pixels=max_pixels)
    except BaseException:
        sock.close()
        raise
    app = create_app(engine, max_upload_bytes=max_upload_bytes, max_k=max_k)
    sock.listen(2048)
    bound_port = sock.getsockname()[1]
    model = engine.describe()["model"]
    announce(f"serving {len(engine)} images in {len(engine.class_counts)} classes from {engine.index.name}")
    announce(f"model {model['checkpoint']} ({model['fingerprint'][:19]}) on {model['device']}, {model['dtype']}")
    if host not in LOOPBACK_HOSTS:
        announce(f"note: listening on {host}: anyone who can reach this machine sees the gallery's images and paths")
    announce(f"open {url_of(host, bound_port)} (API docs: {url_of(host, bound_port)}docs); Ctrl-C stops")
    config = uvicorn.Config(app, log_level="info", access_log=access_log, timeout_graceful_shutdown=5)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn has shut down gracefully, then re-raises Ctrl-C: the end of a normal run, not an error.
        announce("stopped")
    finally:
        sock.close()
