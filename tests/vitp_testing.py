"""Helpers shared by the tests (a module with a unique name, importable from every test folder)."""

import torch
from PIL import Image, ImageDraw


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (init leaves LayerScale, biases and norms constant,
    which would let a wrongly mapped tensor go unnoticed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def hf_to_remote_code(hf_state, depth, prefix="vision_model."):
    """InternVL remote-code names for a transformers InternVLVisionModel state dict, written out
    independently of vitp's key table (remote code fuses q, k, v into one qkv tensor)."""
    out = {
        prefix + "embeddings.class_embedding": hf_state["embeddings.cls_token"],
        prefix + "embeddings.position_embedding": hf_state["embeddings.position_embeddings"],
        prefix + "embeddings.patch_embedding.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
        prefix + "embeddings.patch_embedding.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
    }
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"{prefix}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.qkv.{kind}"] = torch.cat(
                [hf_state[src + f"attention.{p}_proj.{kind}"] for p in "qkv"]
            )
            out[dst + f"attn.proj.{kind}"] = hf_state[src + f"attention.projection_layer.{kind}"]
            out[dst + f"norm1.{kind}"] = hf_state[src + f"layernorm_before.{kind}"]
            out[dst + f"norm2.{kind}"] = hf_state[src + f"layernorm_after.{kind}"]
            out[dst + f"mlp.fc1.{kind}"] = hf_state[src + f"mlp.fc1.{kind}"]
            out[dst + f"mlp.fc2.{kind}"] = hf_state[src + f"mlp.fc2.{kind}"]
        out[dst + "ls1"] = hf_state[src + "lambda_1"]
        out[dst + "ls2"] = hf_state[src + "lambda_2"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def draw_shape(kind: str, colour: tuple[int, int, int], rng, size=(48, 40), extent: int = 24) -> Image.Image:
    """A coloured shape (ellipse, rectangle, cross) or stripes on a random dark background: images whose
    class is visible, for retrieval tests. ``extent`` is the shape's size in pixels."""
    background = tuple(int(v) for v in rng.integers(0, 70, 3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(0, (2 * extent) // 3, 2))
    if kind == "ellipse":
        draw.ellipse([x, y, x + extent, y + extent - 2], fill=colour)
    elif kind == "rectangle":
        draw.rectangle([x, y, x + extent - 2, y + extent - 4], fill=colour)
    elif kind == "cross":
        third = extent * 11 // 30
        draw.rectangle([x + third, y, x + extent - third, y + extent], fill=colour)
        draw.rectangle([x, y + third, x + extent, y + extent - third], fill=colour)
    else:
        period = extent // 3
        for stripe in range(0, size[0], period):
            draw.rectangle([stripe + x % (period // 2), 0, stripe + x % (period // 2) + period // 2 - 1, size[1]], fill=colour)
    return image
