"""Helpers shared by the tests (a module with a unique name, importable from every test folder)."""

import torch


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (init leaves LayerScale, biases and norms constant,
    which would let a wrongly mapped tensor go unnoticed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model
