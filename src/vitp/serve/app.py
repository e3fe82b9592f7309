"""The FastAPI application of `vitp serve`: the page at ``/`` and a JSON API under ``/api``.

* ``POST /api/search``          an uploaded image -> its top-K gallery images (optionally of one class)
* ``GET  /api/search/gallery``  the same for a gallery image given by its path (its class is known,
  so every result says whether it matches; the image itself is left out unless asked for)
* ``GET  /api/gallery``         the gallery, a page at a time; ``GET /api/classes`` its classes
* ``GET  /api/thumbnail``       a JPEG thumbnail of a gallery image (any other path: 404)
* ``GET  /api/health``          liveness, with what is being served and the limits
* ``/docs``, ``/openapi.json``  FastAPI's usual OpenAPI documentation, Swagger UI's assets served by the
  ``fastapi-offline`` package instead of a CDN (air-gapped clusters see it too); no ReDoc page, whose
  script fetches its logo from redoc.ly

Errors are JSON ``{"detail": "<message>"}`` with a 4xx status saying what was wrong with the request.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Literal
from urllib.parse import quote

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, Field

import vitp
from vitp.errors import ServeError, VitpError
from vitp.serve.engine import Hit, SearchEngine

logger = logging.getLogger("vitp")

STATIC_DIR = Path(__file__).with_name("static")
DEFAULT_K = 10
DEFAULT_MAX_K = 100
DEFAULT_MAX_UPLOAD_BYTES = 32 * 2**20
# Room for the multipart envelope (boundaries, part headers) around the image in a request body.
MULTIPART_ALLOWANCE_BYTES = 64 * 2**10
THUMBNAIL_SIZES = (32, 1024)  # smallest and largest side a client may ask for
DEFAULT_THUMBNAIL_SIZE = 256
GALLERY_PAGE_MAX = 500
# The page loads nothing from elsewhere; the browser is told so, and enforces it.
PAGE_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


# --------------------------------------------------------------------------------------------------
# What the API returns (also its OpenAPI schema)


class ResultItem(BaseModel):
    rank: int
    id: int = Field(description="row of the image in the index")
    path: str
    label: str = Field(description="class (the image's folder name)")
    score: float = Field(description="inner product of normalised features: cosine similarity, higher is closer")
    match: bool | None = Field(description="result's class == query's class; null when the query's class is unknown")
    thumbnail: str = Field(description="URL of the result's thumbnail")


class QueryInfo(BaseModel):
    source: Literal["upload", "gallery"]
    name: str = Field(description="the uploaded file's name, or the gallery path")
    path: str | None = Field(description="gallery path (gallery queries only)")
    label: str | None = Field(description="the query's class (gallery queries only)")
    width: int
    height: int


class SearchResponse(BaseModel):
    query: QueryInfo
    k: int
    label_filter: str | None
    exclude_self: bool
    results: list[ResultItem]
    timings_ms: dict[str, float]


class GalleryItem(BaseModel):
    id: int
    path: str
    label: str
    thumbnail: str


class GalleryPage(BaseModel):
    total: int = Field(description="gallery images (of the class asked for)")
    offset: int
    limit: int
    label_filter: str | None
    items: list[GalleryItem]


class ClassCount(BaseModel):
    label: str
    count: int


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int
    max_k: int
    default_k: int


class Health(BaseModel):
    status: Literal["ok"]
    vitp_version: str
    index: str
    index_type: str
    images: int
    classes: int
    model: dict
    limits: Limits


class ErrorMessage(BaseModel):
    detail: str


ERROR_RESPONSES = {status: {"model": ErrorMessage} for status in (400, 404, 413, 415)}


# --------------------------------------------------------------------------------------------------
# Request size limit


class RequestSizeLimit:
    """Refuses request bodies over ``max_bytes`` with a 413 before the application reads them.

    A declared Content-Length is checked first (nothing is read); a body without one (chunked) is
    read into memory only up to the limit. Plain ASGI, so it works the same under every FastAPI.
    ``upload_limit`` is the limit users are told about (``max_bytes`` adds room for the multipart
    envelope).
    """

    def __init__(self, app, max_bytes: int, upload_limit: int):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_limit = upload_limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(int(declared), scope, receive, send)
        if declared is not None:
            return await self.app(scope, receive, send)  # the server stops at the declared length
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(size, scope, receive, send, at_least=True)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, size: int, scope, receive, send, at_least: bool = False) -> None:
        detail = (f"request body of {'more than ' if at_least else ''}{_size_text(size)} is over the upload limit "
                  f"of {_size_text(self.upload_limit)}")
        await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)


def _size_text(size: int) -> str:
    """A byte count for messages: 32.0 MiB, 19.5 KiB, 800 bytes."""
    if size >= 2**20:
        return f"{size / 2**20:.1f} MiB"
    return f"{size / 2**10:.1f} KiB" if size >= 2**10 else f"{size} bytes"


# --------------------------------------------------------------------------------------------------
# The application


def thumbnail_url(path: str) -> str:
    return f"/api/thumbnail?path={quote(path, safe='')}"


def result_items(hits: list[Hit], query_label: str | None) -> list[ResultItem]:
    return [
        ResultItem(
            rank=hit.rank, id=hit.id, path=hit.path, label=hit.label, score=hit.score,
            match=None if query_label is None else hit.label == query_label, thumbnail=thumbnail_url(hit.path),
        )
        for hit in hits
    ]


def create_app(
    engine: SearchEngine, *, max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES, max_k: int = DEFAULT_MAX_K
) -> FastAPI:
    """The web application over a ready :class:`SearchEngine`."""
    app = FastAPIOffline(  # a FastAPI app whose /docs loads its assets from this server
        static_url="/docs-assets",
        redoc_url=None,
        swagger_ui_parameters={"validatorUrl": None},  # Swagger UI's default badge asks validator.swagger.io
        title="vitp retrieval",
        version=vitp.__version__,
        description=(
            "Image retrieval over a vitp index: query images are embedded with the ViT that embedded the gallery "
            "(same checkpoint, layer, pooling and input size) and searched in the index."
        ),
    )
    app.add_middleware(
        RequestSizeLimit, max_bytes=max_upload_bytes + MULTIPART_ALLOWANCE_BYTES, upload_limit=max_upload_bytes
    )
    app.state.engine = engine
    default_k = min(DEFAULT_K, max_k)

    def k_query():
        return Query(default_k, ge=1, le=max_k, description="number of results")

    def label_query():
        return Query(None, description="only results of this class")

    @app.exception_handler(ServeError)
    async def _request_error(request: Request, err: ServeError) -> JSONResponse:
        return JSONResponse({"detail": str(err)}, status_code=err.status_code)

    @app.exception_handler(VitpError)
    async def _internal_error(request: Request, err: VitpError) -> JSONResponse:
        logger.error("%s %s: %s", request.method, request.url.path, err)
        return JSONResponse({"detail": str(err)}, status_code=500)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_SECURITY_POLICY})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/api/health", response_model=Health)
    def health() -> Health:
        return Health(
            status="ok", vitp_version=vitp.__version__, **engine.describe(),
            limits=Limits(max_upload_bytes=max_upload_bytes, max_pixels=engine.max_pixels, max_k=max_k,
                          default_k=default_k),
        )

    @app.get("/api/classes", response_model=list[ClassCount])
    def classes() -> list[ClassCount]:
        return [ClassCount(label=label, count=count) for label, count in engine.class_counts.items()]

    @app.get("/api/gallery", response_model=GalleryPage, responses=ERROR_RESPONSES)
    def gallery(
        offset: int = Query(0, ge=0), limit: int = Query(48, ge=1, le=GALLERY_PAGE_MAX), label: str | None = label_query()
    ) -> GalleryPage:
        label = label or None  # an empty class (an HTML form's "all classes") is no filter
        total, rows = engine.gallery_items(offset, limit, label)
        items = [
            GalleryItem(id=row, path=engine.paths[row], label=engine.labels[row], thumbnail=thumbnail_url(engine.paths[row]))
            for row in rows
        ]
        return GalleryPage(total=total, offset=offset, limit=limit, label_filter=label, items=items)

    @app.post("/api/search", response_model=SearchResponse, responses=ERROR_RESPONSES)
    def search_upload(
        image: UploadFile = File(description=f"JPEG, PNG, TIFF, BMP or WebP, at most {_size_text(max_upload_bytes)}"),
        k: int = k_query(),
        label: str | None = label_query(),
    ) -> SearchResponse:
        label = label or None
        engine.check_class(label)  # before the costly part
        name = image.filename or "upload"
        started = time.perf_counter()
        data = image.file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise ServeError(f"{name}: more than {_size_text(max_upload_bytes)}, the upload limit", 413)
        picture = engine.decode_upload(data, name)
        decode_ms = (time.perf_counter() - started) * 1000
        outcome = engine.search_image(picture, k, label)
        return SearchResponse(
            query=QueryInfo(source="upload", name=name, path=None, label=None, width=picture.width, height=picture.height),
            k=k, label_filter=label, exclude_self=False, results=result_items(outcome.hits, None),
            timings_ms={"decode": decode_ms, "embed": outcome.embed_ms, "search": outcome.search_ms},
        )

    @app.get("/api/search/gallery", response_model=SearchResponse, responses=ERROR_RESPONSES)
    def search_gallery(
        path: str = Query(description="a gallery image, exactly as the API lists it"),
        k: int = k_query(),
        label: str | None = label_query(),
        exclude_self: bool = Query(True, description="leave the query image itself out of the results"),
    ) -> SearchResponse:
        row = engine.gallery_id(path)
        label = label or None
        engine.check_class(label)
        started = time.perf_counter()
        picture = engine.load_gallery_image(path)
        decode_ms = (time.perf_counter() - started) * 1000
        outcome = engine.search_image(picture, k, label, exclude_id=row if exclude_self else None)
        query_label = engine.labels[row]
        return SearchResponse(
            query=QueryInfo(source="gallery", name=path, path=path, label=query_label, width=picture.width,
                            height=picture.height),
            k=k, label_filter=label, exclude_self=exclude_self, results=result_items(outcome.hits, query_label),
            timings_ms={"decode": decode_ms, "embed": outcome.embed_ms, "search": outcome.search_ms},
        )

    @app.get(
        "/api/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorMessage}},
    )
    def thumbnail(
        path: str = Query(description="a gallery image, exactly as the API lists it"),
        size: int = Query(DEFAULT_THUMBNAIL_SIZE, ge=THUMBNAIL_SIZES[0], le=THUMBNAIL_SIZES[1],
                          description="longer side in pixels"),
    ) -> Response:
        data = engine.thumbnail(path, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=600"})

    return app
