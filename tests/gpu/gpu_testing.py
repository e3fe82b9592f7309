"""Helpers of the GPU checks (a module with a unique name, importable from the test files)."""

import torch


def lively_(model: torch.nn.Module, seed: int = 0, attention_scale: float = 4.0) -> torch.nn.Module:
    """Weights that look trained rather than freshly initialised: peaked attention (q/k weights
    ``attention_scale`` x the init scale), norms and LayerScales that differ per channel, non-zero biases. With the init values
    attention is near uniform and a wrong mask or kernel would hardly change the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator).to(parameter.device, parameter.dtype)
            if name.endswith("qkv.weight") or name.endswith(("q_proj.weight", "k_proj.weight")):
                parameter.mul_(attention_scale)
            elif "norm" in name and name.endswith("weight"):
                parameter.add_(0.2 * noise)
            elif name.endswith("gamma"):
                parameter.add_(0.05 * noise)
            elif name.endswith("bias"):
                parameter.add_(0.02 * noise)
    return model
