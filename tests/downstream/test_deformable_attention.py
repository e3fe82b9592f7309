"""Multi-scale deformable attention against a naive re-statement of the operator (loops over every
sampling point, bilinear interpolation written out), with the CUDA kernel's semantics: a location in
[0, 1] spans the whole map, pixel centres at (i + 0.5) / size, zeros outside."""

import math

import pytest
import torch

from vitp.downstream.deformable_attention import MSDeformAttn, deformable_sampling

SHAPES = [(6, 4), (3, 2)]  # the level shapes of upstream's ops/test.py


def naive_bilinear(level, x, y):
    """level (H, W, D); x, y in [0, 1] of the map's extent; zeros outside."""
    height, width, _ = level.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = torch.zeros(level.shape[-1], dtype=level.dtype)
    for yi in (y0, y0 + 1):
        for xi in (x0, x0 + 1):
            if 0 <= xi < width and 0 <= yi < height:
                total += (1 - abs(px - xi)) * (1 - abs(py - yi)) * level[yi, xi]
    return total


def naive_sampling(value, shapes, locations, weights):
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads * head_dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                acc = torch.zeros(head_dim, dtype=value.dtype)
                for lvl, (h, w) in enumerate(shapes):
                    level = value[b, starts[lvl] : starts[lvl + 1], m].reshape(h, w, head_dim)
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        acc += weights[b, q, m, lvl, p] * naive_bilinear(level, x, y)
                out[b, q, m * head_dim : (m + 1) * head_dim] = acc
    return out


def random_inputs(batch=2, queries=5, heads=2, head_dim=3, points=3, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    length = sum(h * w for h, w in shapes)
    value = torch.randn(batch, length, heads, head_dim, generator=g, dtype=torch.float64)
    # beyond [0, 1] too: points off the map read zeros, or part of a border pixel
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=g, dtype=torch.float64)
    return value, locations, weights


def test_sampling_matches_the_naive_operator():
    value, locations, weights = random_inputs()
    ours = deformable_sampling(value, SHAPES, locations, weights)
    assert ours.shape == (2, 5, 6)
    torch.testing.assert_close(ours, naive_sampling(value, SHAPES, locations, weights), rtol=0, atol=1e-12)


def test_a_point_at_a_pixel_centre_reads_that_pixel_and_far_points_read_zero():
    value = torch.randn(1, 6 * 4, 1, 2, dtype=torch.float64)
    row, col = 4, 1
    locations = torch.tensor([[(col + 0.5) / 4, (row + 0.5) / 6], [1.5, 0.5]], dtype=torch.float64)
    locations = locations.view(1, 2, 1, 1, 1, 2)
    out = deformable_sampling(value, [(6, 4)], locations, torch.ones(1, 2, 1, 1, 1, dtype=torch.float64))
    torch.testing.assert_close(out[0, 0], value[0, row * 4 + col, 0])
    assert out[0, 1].abs().max() == 0


def test_gradients_flow_to_values_locations_and_weights():
    value, locations, weights = random_inputs(batch=1, queries=2, heads=2, head_dim=2, points=2)
    for tensor in (value, locations, weights):
        tensor.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v, l, w: deformable_sampling(v, SHAPES, l, w), (value, locations, weights))


def test_module_is_the_deformable_detr_formula():
    """Projections, per-level offset normalisation (pixels of that level), softmax over all of a head's
    points, output projection — recomputed naively from the module's weights."""
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=8, num_levels=2, num_heads=2, num_points=3, value_ratio=0.5).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    batch, queries = 2, 4
    query = torch.randn(batch, queries, 8, dtype=torch.float64)
    feat = torch.randn(batch, sum(h * w for h, w in SHAPES), 8, dtype=torch.float64)
    reference = torch.rand(1, queries, 1, 2, dtype=torch.float64)

    value = (feat @ attn.value_proj.weight.T + attn.value_proj.bias).view(batch, -1, 2, 2)
    offsets = (query @ attn.sampling_offsets.weight.T + attn.sampling_offsets.bias).view(batch, queries, 2, 2, 3, 2)
    logits = (query @ attn.attention_weights.weight.T + attn.attention_weights.bias).view(batch, queries, 2, 6)
    weights = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)
    locations = torch.empty_like(offsets)
    for lvl, (h, w) in enumerate(SHAPES):
        locations[:, :, :, lvl, :, 0] = reference[:, :, 0, 0, None, None] + offsets[:, :, :, lvl, :, 0] / w
        locations[:, :, :, lvl, :, 1] = reference[:, :, 0, 1, None, None] + offsets[:, :, :, lvl, :, 1] / h
    sampled = naive_sampling(value, SHAPES, locations, weights.view(batch, queries, 2, 2, 3))
    expected = sampled @ attn.output_proj.weight.T + attn.output_proj.bias

    torch.testing.assert_close(attn(query, reference, feat, SHAPES), expected, rtol=0, atol=1e-12)


def test_initialisation_is_upstreams():
    heads, levels, points = 8, 3, 4
    attn = MSDeformAttn(dim=32, num_levels=levels, num_heads=heads, num_points=points, value_ratio=0.25)
    bias = attn.sampling_offsets.bias.view(heads, levels, points, 2)
    for h in range(heads):
        angle = 2 * math.pi * h / heads
        c, s = math.cos(angle), math.sin(angle)
        scale = max(abs(c), abs(s))
        for k in range(points):
            for lvl in range(levels):
                torch.testing.assert_close(bias[h, lvl, k], torch.tensor([c, s]) / scale * (k + 1))
    assert attn.sampling_offsets.weight.abs().max() == 0
    assert attn.attention_weights.weight.abs().max() == 0 and attn.attention_weights.bias.abs().max() == 0
    assert attn.value_proj.weight.shape == (8, 32) and attn.output_proj.weight.shape == (32, 8)
    assert attn.value_proj.bias.abs().max() == 0 and attn.output_proj.bias.abs().max() == 0


def test_heads_must_divide_the_value_width():
    with pytest.raises(ValueError, match="deform_num_heads"):
        MSDeformAttn(dim=100, num_levels=1, num_heads=16, num_points=4, value_ratio=0.25)


def test_bfloat16_autocast_samples_in_float32():
    torch.manual_seed(0)
    attn = MSDeformAttn(dim=16, num_levels=2, num_heads=2, num_points=2)
    query, feat = torch.randn(1, 5, 16), torch.randn(1, 30, 16)
    reference = torch.rand(1, 5, 1, 2)
    full = attn(query, reference, feat, SHAPES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(query, reference, feat, SHAPES)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), full, rtol=0.05, atol=0.05)
