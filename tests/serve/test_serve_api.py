"""The `vitp serve` API, in-process: what a client gets back for good and bad requests."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from vitp import build_vit, save_vit
from vitp.cli import main
from vitp.errors import ConfigError, RetrievalError
from vitp.retrieval.feature_file import load_features
from vitp.retrieval.index import RetrievalIndex
from vitp.retrieval.search import embed_queries, search_index
from vitp.serve.app import STATIC_DIR, create_app
from vitp.serve.engine import SearchEngine
from vitp.serve.server import bind_socket, load_engine
from vitp_testing import parser_refusal, randomize_


def upload(client: TestClient, data: bytes, name: str = "query.png", **params):
    return client.post("/api/search", params=params, files={"image": (name, data, "application/octet-stream")})


def true_neighbours(served_gallery, query: Path) -> tuple[list[str], np.ndarray]:
    """Every gallery image ranked by exact cosine similarity to the query, with the query embedded by
    the library behind `vitp search` and compared with the gallery's features file directly."""
    index = RetrievalIndex.load(served_gallery.index, faiss_device="cpu")
    queries, skipped = embed_queries(index, query, device="cpu", num_workers=0, progress_bar=False)
    assert not skipped
    gallery = load_features(served_gallery.features)
    scores = gallery.features @ queries.features[0]
    order = np.argsort(-scores, kind="stable")
    return [str(gallery.image_paths[i]) for i in order], scores[order]


def thumbnail_status(client: TestClient, path: str) -> int:
    return client.get(f"/api/thumbnail?path={quote(path, safe='')}").status_code


# --------------------------------------------------------------------------------------------------
# Health, classes, gallery, page


def test_health_says_what_is_served(client, served_gallery):
    health = client.get("/api/health").json()
    settings = RetrievalIndex.load(served_gallery.index, faiss_device="cpu").feature_settings
    assert health["status"] == "ok"
    assert health["images"] == 25 and health["classes"] == 4  # 4 x 6 images, plus the symlinked one
    assert health["model"]["fingerprint"] == settings["model_fingerprint"]
    assert health["model"]["layer"] == settings["layer"] and health["model"]["pool"] == "mean"
    assert health["limits"]["max_k"] == 50 and health["limits"]["max_upload_bytes"] == 32 * 2**20


def test_classes_and_gallery_pages(client, served_gallery):
    assert client.get("/api/classes").json() == [
        {"label": "cross", "count": 6}, {"label": "disk", "count": 7},
        {"label": "square", "count": 6}, {"label": "stripes", "count": 6},
    ]
    first = client.get("/api/gallery", params={"limit": 10}).json()
    rest = client.get("/api/gallery", params={"offset": 10, "limit": 100}).json()
    assert first["total"] == rest["total"] == 25 and len(first["items"]) == 10 and len(rest["items"]) == 15
    assert [item["path"] for item in first["items"] + rest["items"]] == served_gallery.gallery_images()
    assert client.get("/api/gallery", params={"label": ""}).json()["total"] == 25  # "" = all classes
    disks = client.get("/api/gallery", params={"label": "disk"}).json()
    assert disks["total"] == 7 and {item["label"] for item in disks["items"]} == {"disk"}
    assert str(served_gallery.linked) in [item["path"] for item in disks["items"]]
    response = client.get("/api/gallery", params={"label": "cat"})
    assert response.status_code == 400 and "class 'cat' is not in this gallery" in response.json()["detail"]


def test_page_and_its_assets_are_served_without_anything_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    for file in STATIC_DIR.iterdir():
        text = file.read_text(encoding="utf-8")
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE), f"{file.name} names another host"


def test_openapi_documents_the_api(client):
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/search/gallery", "/api/health", "/api/thumbnail", "/api/gallery"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/api/search"]["post"]["requestBody"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", docs.text)
    assert assets and all(url.startswith("/docs-assets/") for url in assets), assets  # no CDN: works offline
    for url in assets:
        assert client.get(url).status_code == 200, url


# --------------------------------------------------------------------------------------------------
# Searching


def test_upload_gets_the_index_true_nearest_neighbours(client, served_gallery, encode_image):
    query = served_gallery.queries[0]
    response = upload(client, query.read_bytes(), query.name, k=7)
    assert response.status_code == 200
    body = response.json()
    paths, scores = true_neighbours(served_gallery, query)
    assert [r["path"] for r in body["results"]] == paths[:7]
    np.testing.assert_allclose([r["score"] for r in body["results"]], scores[:7], atol=1e-5)
    assert [r["rank"] for r in body["results"]] == list(range(1, 8))
    assert {r["label"] for r in body["results"]} <= {"cross", "disk", "square", "stripes"}
    assert all(r["label"] == Path(r["path"]).parent.name and r["match"] is None for r in body["results"])
    assert body["query"] == {"source": "upload", "name": query.name, "path": None, "label": None, "width": 64, "height": 56}

    # The same answer as `vitp search` gives (same model, settings and index).
    index = RetrievalIndex.load(served_gallery.index, faiss_device="cpu")
    queries, _ = embed_queries(index, query, device="cpu", num_workers=0, progress_bar=False)
    cli_rows = search_index(index, queries, 7).rows()[0]["results"]
    assert [r["path"] for r in cli_rows] == [r["path"] for r in body["results"]]

    # Any supported encoding of the same pixels is the same query (JPEG is lossy: scores move a little).
    as_webp = upload(client, encode_image(Image.open(query), "WEBP"), "q.webp", k=7).json()
    assert [r["path"] for r in as_webp["results"]][:3] == paths[:3]


def test_k_sets_the_number_of_results(client, served_gallery):
    data = served_gallery.queries[1].read_bytes()
    assert len(upload(client, data, k=3).json()["results"]) == 3
    assert len(upload(client, data).json()["results"]) == 10  # the default
    everything = upload(client, data, k=50).json()["results"]
    assert len(everything) == 25  # no more than the gallery has
    for bad_k in (0, 51, "many"):
        response = upload(client, data, k=bad_k)
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["query", "k"]


def test_class_filter_gives_the_nearest_images_of_that_class(client, served_gallery):
    query = served_gallery.queries[0]  # a cross
    paths, _ = true_neighbours(served_gallery, query)
    for label in ("disk", "stripes"):
        results = upload(client, query.read_bytes(), k=4, label=label).json()["results"]
        expected = [path for path in paths if Path(path).parent.name == label][:4]
        assert [r["path"] for r in results] == expected
    all_disks = upload(client, query.read_bytes(), k=20, label="disk").json()["results"]
    assert len(all_disks) == 7 and {r["label"] for r in all_disks} == {"disk"}
    response = upload(client, query.read_bytes(), label="Disk")
    assert response.status_code == 400
    assert response.json()["detail"] == "class 'Disk' is not in this gallery (classes: cross, disk, square, stripes)"


def test_gallery_query_knows_its_class_and_leaves_itself_out(client, served_gallery):
    path = served_gallery.gallery_images()[8]  # a disk
    body = client.get("/api/search/gallery", params={"path": path, "k": 24}).json()
    assert body["query"]["source"] == "gallery" and body["query"]["label"] == "disk"
    results = body["results"]
    assert path not in [r["path"] for r in results] and len(results) == 24  # every other image
    assert [r["match"] for r in results] == [r["label"] == "disk" for r in results]
    assert sum(r["match"] for r in results) == 6
    ranked, _ = true_neighbours(served_gallery, Path(path))
    assert [r["path"] for r in results] == [p for p in ranked if p != path]

    with_itself = client.get("/api/search/gallery", params={"path": path, "k": 3, "exclude_self": "false"}).json()
    assert with_itself["results"][0]["path"] == path and with_itself["results"][0]["score"] == pytest.approx(1, abs=1e-5)

    only_squares = client.get("/api/search/gallery", params={"path": path, "k": 3, "label": "square"}).json()
    assert [r["match"] for r in only_squares["results"]] == [False] * 3


def test_gallery_query_of_a_path_outside_the_gallery_is_404(client, served_gallery):
    for path in (str(served_gallery.secret), str(served_gallery.gallery / "escape.png"), "disk/disk_00.png"):
        response = client.get("/api/search/gallery", params={"path": path})
        assert response.status_code == 404 and "is not an image of this gallery" in response.json()["detail"]


def test_a_searched_gallery_file_that_vanished_is_a_404_with_the_reason(client, served_gallery):
    path = Path(served_gallery.gallery_images()[3])
    moved = path.with_name(".moved")
    path.rename(moved)
    try:
        response = client.get("/api/search/gallery", params={"path": str(path)})
        assert response.status_code == 404 and "cannot be read" in response.json()["detail"]
        assert thumbnail_status(client, str(path)) == 404
    finally:
        moved.rename(path)
    assert thumbnail_status(client, str(path)) == 200


# --------------------------------------------------------------------------------------------------
# Thumbnails


def test_thumbnails_of_gallery_images(client, served_gallery):
    for path in (served_gallery.gallery_images()[0], str(served_gallery.linked)):
        response = client.get("/api/thumbnail", params={"path": path, "size": 40})
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "JPEG" and max(image.size) == 40
    default = client.get("/api/thumbnail", params={"path": served_gallery.gallery_images()[0]})
    assert Image.open(io.BytesIO(default.content)).size == (64, 56)  # never enlarged
    assert client.get("/api/thumbnail", params={"path": served_gallery.gallery_images()[0], "size": 5000}).status_code == 422


def test_thumbnails_outside_the_gallery_are_404(client, served_gallery):
    gallery = served_gallery.gallery
    first = served_gallery.gallery_images()[0]
    outside = [
        str(gallery / "disk" / ".." / ".." / "outside" / "secret.png"),  # ../ out of the gallery
        str(gallery / "disk" / ".." / "disk" / "disk_00.png"),  # ../ back into it: still not the indexed path
        "../outside/secret.png",
        "disk/disk_00.png",  # relative
        os.path.relpath(first),  # relative to the server's working directory
        str(served_gallery.secret),  # absolute, elsewhere
        "/etc/passwd",
        str(gallery / "escape.png"),  # a symlink in the gallery that leaves it
        str(gallery / "up" / "outside" / "secret.png"),  # through a symlinked directory
        str(gallery / "up" / "gallery" / "disk" / "disk_00.png"),
        str(gallery / "square" / "not_indexed.png"),  # in the gallery's folder, but not in the index
        str(served_gallery.index / "meta.json"),
        str(gallery),
        first + "\x00",
        "",
    ]
    for path in outside:
        assert thumbnail_status(client, path) == 404, path
    response = client.get("/api/thumbnail", params={"path": "/etc/passwd"})
    assert response.json() == {"detail": "'/etc/passwd' is not an image of this gallery"}
    assert client.get("/api/thumbnail").status_code == 422
    assert thumbnail_status(client, first) == 200


# --------------------------------------------------------------------------------------------------
# Bad uploads


def test_bad_uploads_get_4xx_with_a_message_and_the_server_keeps_serving(client, served_gallery, encode_image):
    good = served_gallery.queries[2].read_bytes()
    truncated = good[: len(good) // 2]
    gif = encode_image(Image.new("RGB", (20, 20)), "GIF")
    cases = [
        (b"", "empty.png", 400, "empty.png: empty file"),
        (b"name,label\nx,y\n", "table.csv", 415, "table.csv: not an image in a supported format (JPEG, PNG, TIFF, BMP, WEBP)"),
        (gif, "anim.gif", 415, "anim.gif: not an image in a supported format"),
        (truncated, "cut.png", 400, "cut.png: corrupt or truncated image"),
        (good[:60] + bytes(100) + good[160:], "zeroed.png", 400, "zeroed.png: corrupt or truncated image"),
        (b"\x89PNG\r\n\x1a\n" + bytes(64), "header.png", 415, "header.png: not an image in a supported format"),
    ]
    for data, name, status, message in cases:
        response = upload(client, data, name)
        assert response.status_code == status, name
        assert response.json()["detail"].startswith(message), response.json()
    missing = client.post("/api/search", files={"picture": ("q.png", good)})
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "image"]
    assert upload(client, good).status_code == 200


def test_uploads_over_the_size_limits_are_413(engine, served_gallery, encode_image):
    with TestClient(create_app(engine, max_upload_bytes=20_000)) as client:
        noise = np.random.default_rng(0).integers(0, 256, (120, 120, 3), dtype=np.uint8)
        big = encode_image(Image.fromarray(noise), "PNG")  # about 43 kB: over the limit
        response = upload(client, big, "noise.png")
        assert response.status_code == 413 and "the upload limit" in response.json()["detail"]
        # Far over the limit: refused from the declared length, before the body is read.
        response = upload(client, big * 20, "huge.png")
        assert response.status_code == 413
        assert re.fullmatch(r"request body of \d+\.\d KiB is over the upload limit of 19\.5 KiB", response.json()["detail"])

        # Without a declared length (chunked): read only up to the limit.
        def chunks():
            boundary_start = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n'
            yield boundary_start
            for _ in range(40):
                yield big[:10_000]

        response = client.post("/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413 and "request body of more than" in response.json()["detail"]
        assert upload(client, served_gallery.queries[0].read_bytes()).status_code == 200

    # More pixels than the limit: refused from the header, before decoding.
    small_limit = SearchEngine(engine.index, engine.feature_model, max_pixels=64 * 64)
    with TestClient(create_app(small_limit)) as client:
        wide = encode_image(Image.new("RGB", (200, 100)), "PNG")
        response = upload(client, wide, "wide.png")
        assert response.status_code == 413
        assert response.json()["detail"] == "wide.png: too large: 200x100 = 20000 pixels > limit 4096"
        assert upload(client, served_gallery.queries[0].read_bytes()).status_code == 200


def test_16_bit_and_grey_uploads_are_searched_like_gallery_files(client, served_gallery, encode_image):
    """Remote-sensing and medical images are often 16-bit or single-channel."""
    grey = np.linspace(0, 60000, 64 * 56, dtype=np.uint16).reshape(56, 64)
    for image, name in ((Image.fromarray(grey), "scan.tif"), (Image.fromarray((grey // 256).astype(np.uint8)), "g.bmp")):
        fmt = "TIFF" if name.endswith(".tif") else "BMP"
        response = upload(client, encode_image(image, fmt), name, k=2)
        assert response.status_code == 200 and len(response.json()["results"]) == 2


# --------------------------------------------------------------------------------------------------
# Start-up


def test_serving_with_another_model_is_refused(served_gallery, tmp_path):
    other = tmp_path / "other.safetensors"
    save_vit(randomize_(build_vit("internvit-tiny"), std=0.05, seed=7).eval(), other, to="vitp")
    with pytest.raises(RetrievalError, match="different feature settings") as refused:
        load_engine(served_gallery.index, vit_checkpoint=other, device="cpu")
    assert "model_fingerprint" in str(refused.value)


def test_cli_reports_start_up_problems_as_one_line(served_gallery, tmp_path, capsys):
    assert main(["serve", "--index", str(tmp_path / "missing")]) == 2
    assert "not a vitp index" in capsys.readouterr().err
    assert main(["serve", "--index", str(served_gallery.index), "--vit_checkpoint", str(tmp_path / "gone.safetensors"),
                 "--device", "cpu"]) == 2
    assert "no longer exists; pass its new location with vit_checkpoint" in capsys.readouterr().err


def test_a_taken_port_is_a_clean_error():
    taken = bind_socket("127.0.0.1", 0)
    taken.listen()  # as a running server's socket is
    try:
        with pytest.raises(ConfigError, match="cannot listen on 127.0.0.1:.*choose another port"):
            bind_socket("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


@pytest.mark.parametrize("flag, value", [("--port", "70000"), ("--port", "-1"), ("--max_pixels", "0")])
def test_a_bad_number_is_refused_before_the_index_is_read(flag, value, tmp_path, capsys):
    assert f"argument {flag}: {value}: must be" in parser_refusal(
        ["serve", "--index", str(tmp_path / "missing"), flag, value], capsys)
