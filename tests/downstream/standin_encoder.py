"""A small stand-in for ``vitp.downstream.backbone``'s DenseEncoder in the head, segmentor and inference
tests: strided convs giving four maps at 1/4, 1/8, 1/16, 1/32 of the input (sizes rounded up), with
``out_channels`` listing their channels. It keeps those tests independent of the ViT encoder."""

import torch
import torch.nn as nn


class StandInEncoder(nn.Module):
    def __init__(self, out_channels=(8, 12, 16, 24), in_channels: int = 3, batch_norm: bool = False):
        super().__init__()
        self.out_channels = list(out_channels)

        def block(cin, cout):
            norm = nn.BatchNorm2d(cout) if batch_norm else nn.Identity()
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1), norm, nn.ReLU())

        first = self.out_channels[0]
        self.stages = nn.ModuleList([nn.Sequential(block(in_channels, first), block(first, first))])
        for cin, cout in zip(self.out_channels[:-1], self.out_channels[1:]):
            self.stages.append(block(cin, cout))

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        features, x = [], pixels
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features


def fill_batchnorm_statistics_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters for every BatchNorm, so that eval-mode BN is not
    the identity (a wrongly wired norm would go unnoticed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.3)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.3)
    return model
