"""`vitp serve`: the retrieval web page and API."""

from __future__ import annotations

import argparse

from vitp.cli.types import faiss_device_option, port, positive_float, positive_int, vit_options


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this stage's subcommands."""
    parser = subparsers.add_parser(
        "serve", parents=[vit_options(dtype_default=None, batch_options=False), faiss_device_option()],
        help="a web page and JSON API to search a retrieval index with images",
        description=(
            "Serve a page where a query image (dropped, chosen, pasted, or clicked in the gallery) is embedded with the "
            "index's own ViT and its top-K gallery images are shown with score, class and path; and the JSON API behind "
            "it (POST /api/search with an image upload, GET /api/health, ...; OpenAPI docs at /docs). The page uses "
            "nothing from the internet. Listens on the loopback address unless --host says otherwise."
        ),
    )
    parser.add_argument("--index", required=True, help="index directory from `vitp index build`")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s; 0.0.0.0 = every interface)")
    parser.add_argument("--port", type=port, default=8000, help="port (default: %(default)s; 0 = any free port)")
    parser.add_argument("--vit_checkpoint", help="the gallery's ViT checkpoint, if it moved since the index was built")
    parser.add_argument("--max_upload_mb", type=positive_float, default=32.0,
                        help="largest query upload in MiB (default: %(default)s)")
    parser.add_argument("--max_pixels", type=positive_int,
                        help="largest query image in pixels (default: the gallery's limit, Pillow's bomb limit)")
    parser.add_argument("--max_k", type=positive_int, default=100, help="most results a query may ask for (default: %(default)s)")
    parser.add_argument("--no_access_log", action="store_true", help="do not log every request")
    parser.set_defaults(handler=_run_serve)


WEB_PACKAGES = ("fastapi", "starlette", "uvicorn", "multipart", "python_multipart")


def _run_serve(args: argparse.Namespace) -> int:
    from vitp.errors import ConfigError

    try:
        from vitp.serve.server import run_server
    except ModuleNotFoundError as err:
        if err.name and err.name.split(".")[0] in WEB_PACKAGES:
            raise ConfigError(f"vitp serve needs {err.name}, which is not installed: pip install 'vitp[serve]'") from None
        raise

    run_server(
        args.index, args.host, args.port,
        vit_checkpoint=args.vit_checkpoint, device=args.device, dtype=args.dtype, faiss_device=args.faiss_device,
        max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels, max_k=args.max_k,
        access_log=not args.no_access_log,
    )
    return 0
