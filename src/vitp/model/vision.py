"""InternViT, the vision encoder of InternVL and ViTP, built on timm's VisionTransformer.

timm already implements this network (``vit_intern300m_patch14_448``: pre-norm blocks, LayerScale on
both branches, no final norm, fused SDPA attention, DropPath, activation checkpointing). This module
adds only what InternVL needs on top:

* a small config with named presets (InternViT-300M, InternViT-6B, and tiny ones for tests and CPU demos);
* InternViT-6B's differences from 300M: RMSNorm instead of LayerNorm, and QK-normalisation over the
  whole width of q and k (all heads together, before the head split; timm's ``qk_norm`` normalises each
  head on its own, which is another network);
* hidden states indexed the InternVL way: ``hidden_states[0]`` is the embedding output,
  ``hidden_states[i]`` the output of block ``i``, ``select_layer=-1`` the last block;
* position embeddings resampled for other input sizes exactly as InternVL and transformers do it
  (bicubic, no antialias), so that our numbers match theirs at every resolution.

The parameter names are timm's; ``vitp.model.formats.vit`` maps them to and from every checkpoint layout.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import Attention, LayerNorm, RmsNormFp32, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from vitp.errors import ConfigError

# The norms of the blocks (and of QK-norm). RMSNorm is computed in float32 and cast back, as InternViT's
# own RMSNorm and transformers' do.
NORM_LAYERS = {"layer_norm": LayerNorm, "rms_norm": RmsNormFp32}


@dataclass(frozen=True)
class VisionConfig:
    """Shape and regularisation of an InternViT. The defaults are InternViT-300M-448px."""

    image_size: int = 448
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.0
    norm_type: str = "layer_norm"  # "rms_norm" in InternViT-6B
    qk_norm: bool = False  # InternViT-6B: RMSNorm over the whole width of q and of k

    def __post_init__(self) -> None:
        positive = ("image_size", "patch_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"vision config: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"vision config: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision config: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ConfigError(f"vision config: drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.norm_type not in NORM_LAYERS:
            raise ConfigError(f"vision config: norm_type must be one of {sorted(NORM_LAYERS)}, got {self.norm_type!r}")
        if not isinstance(self.qk_norm, bool):
            raise ConfigError(f"vision config: qk_norm must be true or false, got {self.qk_norm!r}")

    @property
    def grid_size(self) -> int:
        """Patches per side at the native image size (32 for 448 px / patch 14)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    def replace(self, **changes: Any) -> "VisionConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VisionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"vision config: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**values)


# Named presets. `internvit-300m` is InternViT-300M-448px(-V2_5), the encoder of InternVL2.5-1B..8B and of
# ViTP's released ViT-L. `internvit-6b-448` is InternViT-6B-448px (V1.2/V1.5/V2.5: 45 layers, the encoder of
# InternVL 1.5, InternVL2-26B..76B and InternVL2.5-26B..78B); `internvit-6b-224` the original 224-px
# InternViT-6B with all 48 layers. The tiny ones exist so that tests and the CPU demo run in seconds.
_INTERNVIT_6B = dict(
    patch_size=14, hidden_size=3200, num_heads=25, intermediate_size=12800, qkv_bias=False,
    norm_type="rms_norm", qk_norm=True,
)
PRESETS: dict[str, VisionConfig] = {
    "internvit-300m": VisionConfig(),
    "internvit-6b-448": VisionConfig(image_size=448, num_layers=45, **_INTERNVIT_6B),
    "internvit-6b-224": VisionConfig(image_size=224, num_layers=48, **_INTERNVIT_6B),
    "internvit-tiny": VisionConfig(
        image_size=112, patch_size=14, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256
    ),
    "internvit-small": VisionConfig(
        image_size=224, patch_size=14, hidden_size=192, num_layers=6, num_heads=6, intermediate_size=768
    ),
    # InternViT-6B's architecture (RMSNorm, whole-width QK-norm, no qkv bias) at a size tests can run
    "internvit-6b-tiny": VisionConfig(
        image_size=112, patch_size=14, hidden_size=100, num_layers=2, num_heads=5, intermediate_size=400,
        qkv_bias=False, norm_type="rms_norm", qk_norm=True,
    ),
}


def vision_config(preset: str, **overrides: Any) -> VisionConfig:
    """A preset by name, with any field overridden (``vision_config("internvit-300m", drop_path_rate=0.1)``)."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown vision preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
    return PRESETS[preset].replace(**overrides)


class WholeWidthQKNormAttention(Attention):
    """timm's attention with InternViT-6B's QK-normalisation: one RMSNorm over all ``hidden_size`` channels
    of q (and one of k), applied before the heads are split. Parameter names stay timm's (``qkv``,
    ``q_norm``, ``k_norm``, ``proj``), as InternVL's checkpoints name them too."""

    def __init__(self, dim: int, num_heads: int = 8, *, norm_layer=None, qk_norm: bool = False, **kwargs: Any):
        super().__init__(dim, num_heads=num_heads, qk_norm=False, norm_layer=norm_layer, **kwargs)
        # Always an RMSNorm (as upstream and transformers), with the epsilon of the blocks' norms, which
        # timm hands over as norm_layer = partial(norm class, eps=...).
        eps = getattr(norm_layer, "keywords", {}).get("eps", 1e-6)
        self.q_norm = RmsNormFp32(dim, eps=eps)
        self.k_norm = RmsNormFp32(dim, eps=eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
        )
        x = self.norm(x.transpose(1, 2).reshape(batch, tokens, self.attn_dim))
        return self.proj_drop(self.proj(x))


class InternViT(VisionTransformer):
    """timm's VisionTransformer configured as InternViT, with InternVL's hidden-state indexing.

    ``forward(pixel_values, select_layer=-1)`` returns the tokens (CLS first) of the selected layer:
    ``select_layer`` counts like InternVL's ``hidden_states`` tuple, where index 0 is the embedding
    output and ``-1`` the last block. Blocks after the selected one are not run.
    """

    def __init__(self, config: VisionConfig) -> None:
        # timm sizes the MLP as int(dim * mlp_ratio); nudge the ratio so that any intermediate size is exact.
        mlp_ratio = config.intermediate_size / config.hidden_size
        if int(config.hidden_size * mlp_ratio) != config.intermediate_size:
            mlp_ratio = (config.intermediate_size + 0.5) / config.hidden_size
        super().__init__(
            img_size=config.image_size,
            patch_size=config.patch_size,
            embed_dim=config.hidden_size,
            depth=config.num_layers,
            num_heads=config.num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=config.qkv_bias,
            init_values=config.layer_scale_init,
            drop_path_rate=config.drop_path_rate,
            norm_layer=partial(NORM_LAYERS[config.norm_type], eps=config.layer_norm_eps),
            attn_layer=WholeWidthQKNormAttention if config.qk_norm else Attention,
            act_layer=nn.GELU,  # exact (erf) GELU, as InternViT's "gelu"
            class_token=True,
            final_norm=False,
            global_pool="",
            num_classes=0,
            dynamic_img_size=True,
        )
        self.config = config

    # ----------------------------------------------------------------------------------------------
    # Embeddings

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Add CLS and position embeddings to patch tokens laid out as (B, H, W, C).

        Replaces timm's version only to resample without antialiasing: InternVL's remote code and
        transformers' InternVLVisionModel both use plain bicubic interpolation (align_corners=False), and
        timm's antialiased default gives different numbers at any other resolution.
        """
        batch, height, width, channels = x.shape
        pos_embed = resample_abs_pos_embed(
            self.pos_embed,
            new_size=(height, width),
            old_size=self.patch_embed.grid_size,
            num_prefix_tokens=1,
            interpolation="bicubic",
            antialias=False,
        )
        cls = self.cls_token.expand(batch, -1, -1)
        x = torch.cat([cls, x.reshape(batch, height * width, channels)], dim=1)
        return self.pos_drop(x + pos_embed)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Embedding output (InternVL's ``hidden_states[0]``): CLS + patch tokens + position embeddings."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be (batch, 3, height, width), got {tuple(pixel_values.shape)}")
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        x = self._pos_embed(x)
        return self.norm_pre(x)

    # ----------------------------------------------------------------------------------------------
    # Blocks

    def resolve_layer(self, select_layer: int) -> int:
        """Map an InternVL layer index (negative counts from the end) to 0..num_layers."""
        depth = len(self.blocks)
        if not -(depth + 1) <= select_layer <= depth:
            raise ValueError(
                f"select_layer={select_layer} is out of range for a {depth}-layer ViT: valid values are "
                f"{-(depth + 1)}..{depth} (0 = embedding output, -1 = last layer)"
            )
        return select_layer % (depth + 1)

    def _run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        block = self.blocks[index]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # Recompute the block in the backward pass instead of storing its activations.
            return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        return block(x)

    def hidden_states(self, pixel_values: torch.Tensor, upto: int = -1) -> list[torch.Tensor]:
        """Hidden states ``[embeddings, block 1, ..., block upto]`` (InternVL's ``hidden_states``)."""
        last = self.resolve_layer(upto)
        x = self.embed(pixel_values)
        states = [x]
        for index in range(last):
            x = self._run_block(index, x)
            states.append(x)
        return states

    def forward(
        self, pixel_values: torch.Tensor, select_layer: int = -1, keep_cls: bool = True
    ) -> torch.Tensor:
        """Tokens of one layer, shape (batch, 1 + patches, hidden) or (batch, patches, hidden)."""
        last = self.resolve_layer(select_layer)
        x = self.embed(pixel_values)
        for index in range(last):
            x = self._run_block(index, x)
        return x if keep_cls else x[:, 1:]

    def drop_path_rates(self) -> list[float]:
        """The per-block DropPath probabilities (linear from 0 to ``drop_path_rate``)."""
        return [getattr(block.drop_path1, "drop_prob", 0.0) for block in self.blocks]


def build_vit(config: VisionConfig | str, **overrides: Any) -> InternViT:
    """An InternViT with freshly initialised weights, from a config or a preset name."""
    if isinstance(config, str):
        config = vision_config(config, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    return InternViT(config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
