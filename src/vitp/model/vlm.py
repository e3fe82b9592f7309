"""The InternVL-style vision-language model that ViTP pretrains.

    pixel tiles -> InternViT -> drop CLS -> pixel shuffle -> mlp1 -> replace <IMG_CONTEXT> embeddings
    -> (TMAug, training only) -> causal LM -> cross-entropy on the answer tokens

The LLM is any Hugging Face causal LM (Qwen2/2.5 first). Attribute names follow InternVL's remote code
(``vision_model``, ``mlp1``, ``language_model``) so that checkpoints map onto them directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import ModelOutput

from vitp.errors import ConfigError
from vitp.model.projector import build_projector, pixel_shuffle, tokens_per_tile
from vitp.model.tmaug import TMAugConfig, apply_tmaug
from vitp.model.vision import PRESETS, InternViT, VisionConfig

IGNORE_INDEX = -100


@dataclass(frozen=True)
class VLMConfig:
    vision: VisionConfig
    text: dict[str, Any]  # the LLM's Hugging Face config (must include model_type)
    image_token_id: int  # id of <IMG_CONTEXT> in the tokenizer
    downsample_ratio: float = 0.5
    select_layer: int = -1
    template: str = "internvl2_5"

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: 256 for 448-px tiles, patch 14, downsample 0.5."""
        return tokens_per_tile(self.vision.image_size, self.vision.patch_size, self.downsample_ratio)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["vision"] = self.vision.to_dict()
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "VLMConfig":
        return cls(**{**values, "vision": VisionConfig.from_dict(values["vision"])})


# LLM shapes of the tiny presets (Qwen2 architecture, trained from scratch on CPU).
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2-tiny": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                       tie_word_embeddings=True),
    "qwen2-small": dict(model_type="qwen2", hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                        tie_word_embeddings=True),
}
VLM_PRESETS: dict[str, tuple[str | VisionConfig, str]] = {
    "internvl-tiny": ("internvit-tiny", "qwen2-tiny"),
    "internvl-small": ("internvit-small", "qwen2-small"),
    # the demo's ViT: 64-px tiles, patch 8 (8x8 grid -> 16 tokens per tile after pixel shuffle)
    "internvl-demo": (
        VisionConfig(image_size=64, patch_size=8, hidden_size=96, num_layers=4, num_heads=4, intermediate_size=384),
        "qwen2-small",
    ),
}


def preset_config(name: str, vocab_size: int, image_token_id: int, **vision_overrides: Any) -> VLMConfig:
    """A from-scratch VLMConfig for a tokenizer of ``vocab_size`` tokens."""
    if name not in VLM_PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(VLM_PRESETS))}")
    vision, text = VLM_PRESETS[name]
    vision = PRESETS[vision] if isinstance(vision, str) else vision
    return VLMConfig(
        vision=vision.replace(**vision_overrides),
        text={**TEXT_PRESETS[text], "vocab_size": vocab_size},
        image_token_id=image_token_id,
    )


@dataclass
class VLMOutput(ModelOutput):
    """Loss (and logits if asked), plus counts the trainer logs. A ModelOutput, so that the
    transformers Trainer can read ``outputs["loss"]``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    answer_tokens: int | None = None  # supervised tokens in this batch
    sequence_tokens: int | None = None  # attended tokens the LLM processed (after TMAug)
    tmaug: dict[str, int] | None = None


class VisionLanguageModel(nn.Module):
    # Read by the transformers Trainer: forward takes `num_items_in_batch` (so the Trainer does not divide
    # the loss by the accumulation steps again), and the loss shifts labels like a causal LM's (so it
    # counts labels[:, 1:] when it computes num_items_in_batch).
    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"

    def __init__(self, config: VLMConfig, tmaug: TMAugConfig | None = None):
        super().__init__()
        self.vlm_config = config
        self.tmaug = tmaug or TMAugConfig()
        self.vision_model = InternViT(config.vision)
        text_config = AutoConfig.for_model(**config.text)
        self.language_model = AutoModelForCausalLM.from_config(text_config)
        self.mlp1 = build_projector(config.vision.hidden_size, text_config.hidden_size, config.downsample_ratio)

    # ----------------------------------------------------------------------------------------------
    # Images

    def extract_feature(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(tiles, 3, H, W) -> (tiles, num_image_token, llm_hidden)."""
        tokens = self.vision_model(pixel_values, select_layer=self.vlm_config.select_layer, keep_cls=False)
        side = int(round(tokens.shape[1] ** 0.5))
        grid = tokens.reshape(tokens.shape[0], side, side, -1)
        shuffled = pixel_shuffle(grid, self.vlm_config.downsample_ratio)
        return self.mlp1(shuffled.reshape(tokens.shape[0], -1, shuffled.shape[-1]))

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        num_tiles: torch.Tensor | None = None,
        where: Sequence[str] | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every <IMG_CONTEXT> replaced, in order, by the projected image tokens."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.vlm_config.image_token_id
        tiles = 0 if pixel_values is None else pixel_values.shape[0]
        self._check_image_token_counts(image_mask, tiles, num_tiles, where)
        if tiles:
            features = self.extract_feature(pixel_values).to(embeds.dtype)
            return embeds.masked_scatter(image_mask.unsqueeze(-1), features)
        if self.training and any(p.requires_grad for p in self.vision_model.parameters()):
            # A batch without images still runs a blank tile through the vision side, with zero weight,
            # so that every trainable parameter has a gradient (DDP/ZeRO expect one on every rank).
            size = self.vlm_config.vision.image_size
            blank = self.extract_feature(embeds.new_zeros(1, 3, size, size, dtype=torch.float32))
            embeds = embeds + 0.0 * blank.sum().to(embeds.dtype)
        return embeds

    def _check_image_token_counts(self, image_mask, tiles: int, num_tiles, where) -> None:
        per_tile = self.vlm_config.num_image_token
        found = image_mask.sum(dim=1)
        if num_tiles is None:  # no per-sample tile counts: check the batch total only
            if int(found.sum()) != tiles * per_tile:
                raise ValueError(
                    f"the batch has {int(found.sum())} <IMG_CONTEXT> tokens but {tiles} tiles x {per_tile} tokens"
                )
            return
        expected = num_tiles.to(found.device) * per_tile
        for row in (found != expected).nonzero(as_tuple=True)[0].tolist():
            name = where[row] if where else f"sample {row} of the batch"
            raise ValueError(
                f"{name}: {int(found[row])} <IMG_CONTEXT> tokens for {int(num_tiles[row])} tile(s) x {per_tile} "
                f"tokens; the text and the images of this sample do not match"
            )

    # ----------------------------------------------------------------------------------------------
    # Forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        num_tiles: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        where: Sequence[str] | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> VLMOutput:
        embeds = self.embed_inputs(input_ids, pixel_values, num_tiles, where)
        # Right-padded batches: positions are 0..n-1, which the LLM derives itself (and then keeps its
        # fastest attention path). Only TMAug's dropped tokens leave gaps that need explicit positions.
        position_ids = None
        tmaug_stats: dict[str, int] | None = None
        if self.training and self.tmaug.active:
            position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
            image_mask = input_ids == self.vlm_config.image_token_id
            batch = apply_tmaug(embeds, attention_mask, position_ids, labels, image_mask, self.tmaug)
            embeds, attention_mask, position_ids, labels = (
                batch.inputs_embeds, batch.attention_mask, batch.position_ids, batch.labels
            )
            tmaug_stats = {
                "tmaug_samples": batch.augmented_samples,
                "tmaug_tokens": batch.affected_tokens,
                "samples": int(input_ids.shape[0]),
            }
        decoder = self.language_model.get_decoder()
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        lm_head = self.language_model.get_output_embeddings()
        loss, answer_tokens = None, 0
        if labels is not None:
            loss, answer_tokens = answer_loss(hidden, labels, lm_head, num_items_in_batch)
        return VLMOutput(
            loss=loss,
            logits=lm_head(hidden) if return_logits else None,
            answer_tokens=answer_tokens,
            sequence_tokens=int(attention_mask.sum()),
            tmaug=tmaug_stats,
        )

    # ----------------------------------------------------------------------------------------------
    # Training switches

    def freeze(self, llm: bool = False, backbone: bool = False, mlp: bool = False) -> None:
        for module, frozen in ((self.language_model, llm), (self.vision_model, backbone), (self.mlp1, mlp)):
            for parameter in module.parameters():
                parameter.requires_grad_(not frozen)

    def set_gradient_checkpointing(self, enable: bool = True) -> None:
        self.vision_model.set_grad_checkpointing(enable)
        if enable:
            self.language_model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            self.language_model.activation_checkpointing_disable()


def answer_loss(
    hidden: torch.Tensor, labels: torch.Tensor, lm_head: nn.Module, num_items_in_batch: int | torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on the supervised positions only.

    The LM head runs on those positions alone: answers are a small part of a sequence full of image
    tokens, and a full (batch, length, vocabulary) logit tensor is the largest allocation of a step.
    With ``num_items_in_batch`` (the supervised tokens of all micro-batches of an optimizer step) the
    sum is divided by it, so that gradient accumulation weighs every token equally."""
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    count = int(selected.sum())
    logits = lm_head(hidden[:, :-1][selected]).float()
    total = F.cross_entropy(logits, targets[selected], reduction="sum")
    if num_items_in_batch is not None:
        return total / num_items_in_batch, count
    return total / max(count, 1), count
