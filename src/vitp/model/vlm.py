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
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface
from transformers.utils import ModelOutput

from vitp.data.templates import ClassifyTarget
from vitp.errors import ConfigError
from vitp.model.projector import build_projector, pixel_shuffle, tokens_per_tile
from vitp.model.tmaug import TMAugConfig, apply_tmaug, apply_tsaug
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
    classifier_loss: torch.Tensor | None = None  # the choice loss's share of ``loss``


CLASSIFIER_LABEL_SMOOTHING = 0.01  # upstream's


class VisionLanguageModel(nn.Module):
    # Read by the transformers Trainer: forward takes `num_items_in_batch` (so the Trainer does not divide
    # the loss by the accumulation steps again), and the loss shifts labels like a causal LM's (so it
    # counts labels[:, 1:] when it computes num_items_in_batch).
    accepts_loss_kwargs = True
    loss_type = "ForCausalLM"
    main_input_name = "input_ids"

    def __init__(self, config: VLMConfig, tmaug: TMAugConfig | None = None, tsaug_prob: float = 0.0):
        super().__init__()
        self.vlm_config = config
        self.tmaug = tmaug or TMAugConfig()
        self.tsaug_prob = tsaug_prob
        self.label_smoothing = 0.0  # the Trainer's --label_smoothing_factor, applied to the answer tokens
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
        image_flags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every <IMG_CONTEXT> replaced, in order, by the projected image tokens.
        ``image_flags`` (tiles,) marks real tiles; the others are padding (upstream's strict packing
        mode runs them through the ViT for a fixed batch shape, and their features are discarded)."""
        embeds = self.language_model.get_input_embeddings()(input_ids)
        image_mask = input_ids == self.vlm_config.image_token_id
        if pixel_values is not None and pixel_values.shape[0]:
            features = self.extract_feature(pixel_values).to(embeds.dtype)
        elif self.training and any(p.requires_grad for p in self.vision_model.parameters()):
            # A batch without images still runs a blank tile through the vision side, with zero weight,
            # so that every trainable parameter has a gradient (DDP/ZeRO expect one on every rank).
            size = self.vlm_config.vision.image_size
            features = self.extract_feature(embeds.new_zeros(1, 3, size, size, dtype=torch.float32)).to(embeds.dtype)
            image_flags = torch.zeros(1, dtype=torch.bool, device=embeds.device)
        else:
            features = embeds.new_zeros(0, self.vlm_config.num_image_token, embeds.shape[-1])
        real = features if image_flags is None else features[image_flags.bool()]
        self._check_image_token_counts(image_mask, real.shape[0], num_tiles)
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), real)
        if real.shape[0] < features.shape[0]:  # padding tiles: zero weight, but a gradient path
            embeds = embeds + 0.0 * features.sum()
        return embeds

    def _check_image_token_counts(self, image_mask, tiles: int, num_tiles) -> None:
        """A guard for callers that build batches themselves; vitp's dataset refuses a sample whose
        text and images do not match at its file:line before it reaches a batch."""
        per_tile = self.vlm_config.num_image_token
        found = image_mask.sum(dim=1)
        if num_tiles is None:  # no per-row tile counts: check the batch total only
            if int(found.sum()) != tiles * per_tile:
                raise ValueError(
                    f"the batch has {int(found.sum())} <IMG_CONTEXT> tokens but {tiles} tiles x {per_tile} tokens"
                )
            return
        expected = num_tiles.to(found.device) * per_tile
        for row in (found != expected).nonzero(as_tuple=True)[0].tolist():
            raise ValueError(
                f"row {row} of the batch: {int(found[row])} <IMG_CONTEXT> tokens for {int(num_tiles[row])} tile(s) x {per_tile} "
                f"tokens; the text and the images of this sample do not match"
            )

    def get_input_embeddings(self) -> nn.Module:
        """The LLM's token embeddings (the Trainer's NEFTune hooks them, as on InternVL's remote model)."""
        return self.language_model.get_input_embeddings()

    # ----------------------------------------------------------------------------------------------
    # Forward

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        num_tiles: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        loss_weight: torch.Tensor | None = None,
        classify: Sequence[tuple[int, ClassifyTarget]] | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        num_samples_in_batch: int | torch.Tensor | None = None,
        return_logits: bool = False,
    ) -> VLMOutput:
        """A padded batch (``attention_mask`` 0 on padding), or a packed one: several samples per row,
        ``segment_ids`` (B, L) naming each token's sample (-1 on padding) and ``position_ids`` restarting
        at 0 for every sample; tokens attend only within their own sample.

        The loss is the sum over supervised tokens of ``loss_weight`` x cross-entropy (weight 1 when
        not given), divided by ``num_items_in_batch`` (the trainer's normaliser, e.g. the weights of the
        whole optimizer step; this batch's own weights if None: upstream's per-micro-batch mean), plus the
        choice loss of ``classify`` ((row, target) of each choice question) divided by
        ``num_samples_in_batch`` (the samples of the step; of this batch if None)."""
        embeds = self.embed_inputs(input_ids, pixel_values, num_tiles, image_flags)
        image_mask = input_ids == self.vlm_config.image_token_id
        packed = segment_ids is not None
        augment = self.training and (self.tmaug.active or self.tsaug_prob > 0)
        if augment and position_ids is None:
            # Right-padded rows: positions 0..n-1, written out because augmentation moves them around.
            position_ids = (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
        tmaug_stats: dict[str, int] | None = None
        if augment and self.tsaug_prob > 0:
            embeds, position_ids, shuffled = apply_tsaug(embeds, position_ids, image_mask, self.tsaug_prob, segment_ids)
            tmaug_stats = {"tsaug_samples": shuffled}
        if augment and self.tmaug.active:
            per_token = {"position_ids": position_ids, "labels": labels, "loss_weight": loss_weight,
                         "segment_ids": segment_ids}
            batch = apply_tmaug(embeds, attention_mask, image_mask, self.tmaug,
                                {k: v for k, v in per_token.items() if v is not None}, segment_ids)
            embeds, attention_mask = batch.inputs_embeds, batch.attention_mask
            position_ids = batch.per_token["position_ids"]
            labels, loss_weight = batch.per_token.get("labels"), batch.per_token.get("loss_weight")
            segment_ids = batch.per_token.get("segment_ids")
            classify = moved_through(classify, batch.kept)
            tmaug_stats = {**(tmaug_stats or {}), "tmaug_samples": batch.augmented_samples,
                           "tmaug_tokens": batch.affected_tokens}
        if tmaug_stats is not None:
            tmaug_stats["samples"] = count_samples(attention_mask, segment_ids)
        decoder = self.language_model.get_decoder()
        attention = segment_attention(segment_ids, self.language_model.config, embeds.dtype) if packed else {
            "attention_mask": attention_mask}
        hidden = decoder(inputs_embeds=embeds, position_ids=position_ids, use_cache=False, **attention).last_hidden_state
        lm_head = self.language_model.get_output_embeddings()
        loss, answer_tokens, classifier = None, 0, None
        if labels is not None:
            loss, answer_tokens = answer_loss(hidden, labels, lm_head, num_items_in_batch, loss_weight,
                                              self.label_smoothing)
            if classify:
                samples = num_samples_in_batch or count_samples(attention_mask, segment_ids)
                classifier = choice_loss(hidden, lm_head, classify) / samples
                loss = loss + classifier
        return VLMOutput(
            loss=loss,
            logits=lm_head(hidden) if return_logits else None,
            answer_tokens=answer_tokens,
            sequence_tokens=int((segment_ids >= 0).sum()) if segment_ids is not None else int(attention_mask.sum()),
            tmaug=tmaug_stats,
            classifier_loss=classifier,
        )

    # ----------------------------------------------------------------------------------------------
    # Training switches

    def freeze(self, llm: bool = False, backbone: bool = False, mlp: bool = False) -> None:
        for module, frozen in ((self.language_model, llm), (self.vision_model, backbone), (self.mlp1, mlp)):
            for parameter in module.parameters():
                parameter.requires_grad_(not frozen)

    def set_gradient_checkpointing(self, enable: bool = True, **llm_options: Any) -> None:
        """Recompute activations in the backward pass, in the ViT and in the LLM (upstream's
        --grad_checkpoint; the Trainer's --gradient_checkpointing calls the method below)."""
        self.vision_model.set_grad_checkpointing(enable)
        if enable:
            options = {"activation_checkpointing_kwargs": {"use_reentrant": False}, **llm_options}
            self.language_model.activation_checkpointing_enable(**options)
        else:
            self.language_model.activation_checkpointing_disable()

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        **options: Any) -> None:
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.set_gradient_checkpointing(True, activation_checkpointing_kwargs=kwargs, **options)


def count_samples(attention_mask: torch.Tensor, segment_ids: torch.Tensor | None) -> int:
    """Samples in a batch: its rows, or the segments of its packed rows."""
    if segment_ids is None:
        return int((attention_mask.sum(dim=1) > 0).sum())
    return sum(len(torch.unique(row[row >= 0])) for row in segment_ids)


PACKED_SDPA = "vitp_packed_sdpa"


def packed_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, cu_seq_lens_q: torch.Tensor | None = None,
                          **kwargs: Any) -> tuple[torch.Tensor, None]:
    """PyTorch SDPA on each packed sample on its own, with its causal kernel: a block-diagonal mask
    over the whole row would compute (and then discard) every cross-sample block. Without packing
    boundaries it is plain SDPA. Registered with transformers as ``vitp_packed_sdpa``."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    batch, _, length, _ = query.shape
    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()  # segments of the flattened batch

    def segments(states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        # (B, heads, L, dim) -> (heads, B*L, dim), cut along the tokens: one split, whose backward is one
        # concatenation (slicing each segment out would add a full-size gradient per segment)
        flat = states.transpose(0, 1).reshape(states.shape[1], -1, states.shape[-1])
        return flat.split(lengths, dim=1)

    pieces = [sdpa_attention_forward(module, q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, **kwargs)[0]
              for q, k, v in zip(segments(query), segments(key), segments(value))]  # (1, segment, heads, dim)
    return torch.cat(pieces, dim=1).reshape(batch, length, *pieces[0].shape[2:]), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)


def use_packed_attention(model: "VisionLanguageModel") -> None:
    """For packed batches: PyTorch SDPA per sample instead of over a masked row (flash attention, which
    has its own varlen kernel, is kept)."""
    config = model.language_model.config
    if getattr(config, "_attn_implementation", "sdpa") == "sdpa":
        model.language_model.set_attn_implementation(PACKED_SDPA)


def segment_attention(segment_ids: torch.Tensor, text_config: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Attention arguments that keep each packed sample to itself.

    Flash attention and ``vitp_packed_sdpa`` get the boundaries as cumulative lengths over the
    flattened batch (their varlen paths); any other kernel a 4D mask, causal within a sample and empty
    across samples (transformers uses a 4D mask as given). Padding (-1) forms its own segment."""
    implementation = getattr(text_config, "_attn_implementation", None) or "sdpa"
    if implementation.startswith("flash_attention") or implementation == PACKED_SDPA:
        flat = segment_ids.reshape(-1)
        rows = torch.arange(segment_ids.shape[0], device=flat.device).repeat_interleave(segment_ids.shape[1])
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = (flat[1:] != flat[:-1]) | (rows[1:] != rows[:-1])
        boundaries = torch.cat([starts.nonzero(as_tuple=True)[0], flat.new_tensor([flat.numel()])]).to(torch.int32)
        longest = int((boundaries[1:] - boundaries[:-1]).max())
        return {"cu_seq_lens_q": boundaries, "cu_seq_lens_k": boundaries, "max_length_q": longest,
                "max_length_k": longest}
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = (segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)) & causal
    if implementation == "sdpa":
        return {"attention_mask": allowed.unsqueeze(1)}
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return {"attention_mask": blocked.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)}


def moved_through(classify: Sequence[tuple[int, ClassifyTarget]] | None,
                  kept: torch.Tensor) -> list[tuple[int, ClassifyTarget]] | None:
    """Classifier positions after TMAug removed tokens: the new index of each (always kept) text token."""
    if not classify:
        return classify
    new_index = kept.long().cumsum(dim=1) - 1
    return [(row, dataclasses.replace(target, position=int(new_index[row, target.position])))
            for row, target in classify]


def answer_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    num_items_in_batch: int | torch.Tensor | None,
    loss_weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, int]:
    """Weighted next-token cross-entropy on the supervised positions only.

    The LM head runs on those positions alone: answers are a small part of a sequence full of image
    tokens, and a full (batch, length, vocabulary) logit tensor is the largest allocation of a step.
    ``loss_weight`` (B, L) weighs each label (upstream's packed loss reduction: 1, 1/n or 1/sqrt(n) for
    a sample with n supervised tokens). The sum is divided by ``num_items_in_batch`` when given (the
    summed weights of all micro-batches of an optimizer step, say, so that gradient accumulation weighs
    every token as one large batch would), else by this batch's own weights (a weighted mean)."""
    targets = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    count = int(selected.sum())
    logits = lm_head(hidden[:, :-1][selected]).float()
    losses = F.cross_entropy(logits, targets[selected], reduction="none", label_smoothing=label_smoothing)
    weights = torch.ones_like(losses) if loss_weight is None else loss_weight[:, 1:][selected].float()
    total = (losses * weights).sum()
    denominator = weights.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
    # a step without any supervised token (every sample of a packed batch failed to build) learns nothing
    return total / denominator.to(total.device).clamp(min=1e-12), count


def choice_loss(hidden: torch.Tensor, lm_head: nn.Module, classify: Sequence[tuple[int, ClassifyTarget]]) -> torch.Tensor:
    """Summed cross-entropy (label smoothing 0.01) of each answer's first token among the first tokens
    of its choices, from the logits that predict it (upstream's --use_classifier loss)."""
    total = hidden.new_zeros((), dtype=torch.float32)
    for row, target in classify:
        logits = lm_head(hidden[row, target.position - 1]).float()
        choices = torch.tensor(target.choice_ids, device=logits.device)
        answer = torch.tensor(target.choice_ids.index(target.answer_id), device=logits.device)
        total = total + F.cross_entropy(logits[choices], answer, label_smoothing=CLASSIFIER_LABEL_SMOOTHING)
    return total
