"""Retrieval on a GPU: `vitp features --device cuda` against CPU features, and GPU FAISS against CPU FAISS."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vitp import save_vit
from vitp.cli import main
from vitp.retrieval.feature_file import load_features

pytestmark = pytest.mark.gpu

MIN_COSINE = 0.999  # bf16 on the device against fp32 on the CPU, per image


def draw_images(root, count: int = 6) -> None:
    rng = np.random.default_rng(0)
    for i in range(count):
        image = Image.fromarray(rng.integers(0, 255, (200, 260, 3), dtype=np.uint8))
        x, y = (int(v) for v in rng.integers(0, 120, 2))
        ImageDraw.Draw(image).ellipse([x, y, x + 120, y + 90], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i}.png")


def test_features_on_the_device_match_cpu_features(lively_vit, device, tmp_path):
    draw_images(tmp_path / "images")
    save_vit(lively_vit, tmp_path / "vit.safetensors")
    outputs = {}
    for name, where, dtype in (("cpu", "cpu", "fp32"), ("device", device, "bf16")):
        outputs[name] = tmp_path / f"{name}.npz"
        code = main(["features", "--image_dir", str(tmp_path / "images"), "--output", str(outputs[name]),
                     "--vit_checkpoint", str(tmp_path / "vit.safetensors"), "--device", where, "--dtype", dtype,
                     "--batch_size", "4", "--num_workers", "0", "--no_progress"])
        assert code == 0
    cpu, on_device = load_features(outputs["cpu"]), load_features(outputs["device"])
    assert list(cpu.image_paths) == list(on_device.image_paths) and len(cpu.image_paths) == 6
    cosines = np.sum(cpu.features * on_device.features, axis=1)
    assert cosines.min() >= MIN_COSINE, cosines


def test_gpu_faiss_returns_the_cpu_results():
    from vitp.retrieval.backends.faiss import gpu_count, to_search_device

    if gpu_count() == 0:
        pytest.skip("this FAISS has no GPU support (faiss-cpu) or sees no GPU")
    import faiss

    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((20000, 256)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[:200] + 0.05 * rng.standard_normal((200, 256)).astype(np.float32)
    cpu_index = faiss.IndexFlatIP(256)
    cpu_index.add(gallery)
    gpu_index = to_search_device(faiss.clone_index(cpu_index), "gpu")
    assert "Gpu" in type(gpu_index).__name__ or torch.cuda.device_count() == 0
    cpu_scores, cpu_ids = cpu_index.search(queries, 10)
    gpu_scores, gpu_ids = gpu_index.search(queries, 10)
    assert np.allclose(gpu_scores, cpu_scores, atol=1e-4)
    assert (gpu_ids == cpu_ids).mean() >= 0.99  # near-ties may swap places
    assert (gpu_ids[:, 0] == np.arange(200)).all()
