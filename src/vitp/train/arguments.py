"""The arguments of `vitp pretrain`: upstream's trainer, flag for flag.

Three dataclasses, parsed by ``transformers.HfArgumentParser`` as InternVL's
``internvl_chat_finetune.py`` and transformers' examples do:

* :class:`ModelArguments` and :class:`DataTrainingArguments`: every field of upstream's (ViTP's
  version, with TMAug_prob, TSAug_prob, use_classifier and use_CoT), with upstream's defaults, plus a
  few of vitp's own (from-scratch presets, the system message, the explicit TMAug triple);
* :class:`TrainingArguments`: transformers' own, plus the fields of the transformers 4.37 that upstream
  pins and that transformers 5 removed (``--evaluation_strategy``, ``--warmup_ratio``,
  ``--overwrite_output_dir``, ``--group_by_length`` ...), each mapped to what replaced it.

Each field does what upstream does with it, or is refused with the reason; the few that change
nothing (as in upstream) are listed in :data:`NO_EFFECT` and reported when set.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import transformers

from vitp.data.templates import TEMPLATES
from vitp.errors import ConfigError
from vitp.model.tmaug import MODES, TMAugConfig


# vitp.model.vlm.VLM_PRESETS' names, written out: importing that module here would add seconds to every
# `vitp pretrain --help` and `vitp data check` (a test keeps the two equal)
MODEL_PRESETS = ("internvl-demo", "internvl-small", "internvl-tiny")


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass
class ModelArguments:
    """Which model to train and which of its parts (upstream's ModelArguments)."""

    model_name_or_path: str | None = field(default=None, metadata=_help(
        "InternVL checkpoint directory: remote-code (InternVL2/2.5/3) or transformers-native (*-hf, vitp's own)"))
    vision_path: str | None = field(default=None, metadata=_help(
        "compose a new model: the InternViT checkpoint (with --llm_path; instead of --model_name_or_path)"))
    llm_path: str | None = field(default=None, metadata=_help("compose a new model: the LLM checkpoint (and tokenizer)"))
    mlp_path: str | None = field(default=None, metadata=_help(
        "projector (mlp1) weights to load over the model's, e.g. from a stage-1 run (.pth/.bin/.safetensors)"))
    freeze_llm: bool = field(default=False, metadata=_help("freeze the LLM"))
    freeze_backbone: bool = field(default=False, metadata=_help("freeze the ViT"))
    freeze_mlp: bool = field(default=False, metadata=_help("freeze the projector (mlp1)"))
    unfreeze_vit_layers: int = field(default=0, metadata=_help(
        "train the ViT layers [K:] after the freezing flags, as upstream slices them (-4: the last four)"))
    vision_select_layer: int = field(default=-1, metadata=_help("ViT layer whose features feed the LLM (-1: last)"))
    use_backbone_lora: int = field(default=0, metadata=_help("LoRA rank for the ViT (0: none); alpha is twice the rank"))
    use_llm_lora: int = field(default=0, metadata=_help("LoRA rank for the LLM (0: none); alpha is twice the rank"))
    unfreeze_lm_head: bool = field(default=False, metadata=_help(
        "train the LLM's output layer even when the LLM is frozen or under LoRA"))
    grad_checkpoint: bool = field(default=True, metadata=_help("recompute activations in the backward pass (ViT and LLM)"))
    drop_path_rate: float = field(default=0.0, metadata=_help("stochastic depth of the ViT (ViTP: 0.1)"))
    ps_version: Literal["v1", "v2"] = field(default="v2", metadata=_help("pixel-shuffle version (v2 only, see README)"))
    use_fast_tokenizer: bool = field(default=False, metadata=_help("load the Rust (fast) tokenizer"))
    use_liger: bool = field(default=False, metadata=_help("Liger's fused kernels for the LLM (pip install 'vitp[liger]')"))
    # vitp's own
    model_preset: str | None = field(default=None, metadata=_help(
        "train from scratch, with --tokenizer: one of the presets listed", choices=MODEL_PRESETS))
    tokenizer: str | None = field(default=None, metadata=_help("tokenizer directory of a --model_preset model"))

    def __post_init__(self) -> None:
        if self.ps_version != "v2":
            raise ConfigError(
                "ps_version 'v1' (pixel shuffle without swapping height and width back) is not supported: vitp's "
                "checkpoints are transformers InternVL models, which implement 'v2' only, so a v1 model would load "
                "there with its image tokens transposed. InternVL2/2.5/3 checkpoints use 'v2'.")
        for name in ("use_backbone_lora", "use_llm_lora"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} is a LoRA rank: 0 (no LoRA) or more, got {getattr(self, name)}")
        composed = self.vision_path is not None or self.llm_path is not None
        sources = [name for name, given in (("model_name_or_path", self.model_name_or_path),
                                            ("model_preset", self.model_preset),
                                            ("vision_path/llm_path", composed)) if given]
        if len(sources) > 1:
            raise ConfigError(f"give one model source, not {' and '.join(sources)}")
        if not sources:
            raise ConfigError("give a model: model_name_or_path (a checkpoint), vision_path with llm_path (compose "
                              "one), or model_preset with tokenizer (from scratch)")
        if composed and not (self.vision_path and self.llm_path):
            raise ConfigError("composing a model needs both vision_path and llm_path")
        if self.model_preset and not self.tokenizer:
            raise ConfigError("a from-scratch model_preset needs tokenizer (see `vitp tokenizer train`)")
        if self.tokenizer and not self.model_preset:
            raise ConfigError("tokenizer is for model_preset; a checkpoint brings its own tokenizer")


@dataclass
class DataTrainingArguments:
    """The data and how samples are built (upstream's DataTrainingArguments). ``vitp data check``
    reads the same fields."""

    max_seq_length: int = field(default=8192, metadata=_help("tokens per sample; longer samples are truncated"))
    force_image_size: int = field(default=448, metadata=_help("tile size in pixels (the ViT's position embedding is resampled)"))
    down_sample_ratio: float = field(default=0.5, metadata=_help("pixel-shuffle ratio; must match the model's"))
    pad2square: bool = field(default=False, metadata=_help("pad each tile to a square with the mean colour (data without data_augment)"))
    conv_style: str | None = field(default=None, metadata=_help(
        "chat template (default: the checkpoint's template, internvl2_5 for presets)", choices=TEMPLATES))
    meta_path: str | None = field(default=None, metadata=_help("meta JSON of the datasets (upstream format)"))
    use_data_resampling: bool = field(default=False, metadata=_help(
        "draw datasets by the square root of their size (small datasets more often)"))
    dynamic_image_size: bool = field(default=False, metadata=_help("tile each image by its aspect ratio (InternVL's dynamic resolution)"))
    use_thumbnail: bool = field(default=False, metadata=_help("add a whole-image thumbnail tile to multi-tile images"))
    min_dynamic_patch: int = field(default=1, metadata=_help("fewest tiles per image"))
    max_dynamic_patch: int = field(default=12, metadata=_help("most tiles per image (a dataset's own max_dynamic_patch wins)"))
    min_num_frame: int = field(default=8, metadata=_help("video only; no effect on image data (vitp has no video support)"))
    max_num_frame: int = field(default=32, metadata=_help("video only; no effect on image data (vitp has no video support)"))
    use_CoT: bool = field(default=False, metadata=_help("not supported (see README)"))
    use_classifier: bool = field(default=False, metadata=_help(
        "auxiliary choice loss on <cls> questions (internvl2_5 template)"))
    TSAug_prob: float = field(default=0.0, metadata=_help("probability that a sample's image tokens are shuffled"))
    TMAug_prob: float = field(default=0.0, metadata=_help(
        "ViTP's TMAug: with probability 1-P drop a fraction P of a sample's image tokens (ViTP: 0.75)"))
    normalize_type: Literal["imagenet", "clip", "siglip"] = field(default="imagenet", metadata=_help(
        "image normalisation (mean and std of the vision tower's pretraining)"))
    use_packed_ds: bool = field(default=False, metadata=_help("pack several samples into each sequence (needs max_steps)"))
    num_images_expected: int = field(default=40, metadata=_help("most tiles per packed sequence"))
    max_packed_tokens: int = field(default=8192, metadata=_help("most tokens per packed sequence (at least max_seq_length)"))
    max_buffer_size: int = field(default=20, metadata=_help("packed sequences being filled at once"))
    log_freq: int = field(default=1000, metadata=_help("log packing statistics every so many packed sequences"))
    strict_mode: bool = field(default=True, metadata=_help(
        "pad every packed sequence to max_packed_tokens tokens and num_images_expected tiles"))
    replacement: bool = field(default=False, metadata=_help("restart a dataset (reshuffled) when it runs out, instead of leaving the draw"))
    allow_overflow: bool = field(default=False, metadata=_help("not supported: vitp never cuts a sample across packed sequences"))
    loss_reduction: Literal["token", "sample", "square"] = field(default="token", metadata=_help(
        "weigh each sample's tokens 1, 1/n or 1/sqrt(n) (n: its supervised tokens) in packed batches; padded "
        "batches take their token mean, as upstream (see loss_reduction_padded)"))
    loss_reduction_all_gather: bool = field(default=False, metadata=_help(
        "normalise the loss by the weights of all ranks: each micro-batch's, averaged over the ranks, under "
        "loss_normalization micro_batch (upstream; packed batches); the step's under step (transformers 5's "
        "average_tokens_across_devices, on by default)"))
    # vitp's own
    loss_reduction_padded: bool = field(default=False, metadata=_help(
        "apply loss_reduction and loss_reduction_all_gather to padded batches too (upstream: packed batches only)"))
    system_message: str | None = field(default=None, metadata=_help("system prompt for lines without a system turn (default: the template's)"))
    tmaug_prob: float = field(default=0.0, metadata=_help("explicit TMAug: probability that a sample is augmented"))
    tmaug_ratio: float = field(default=0.0, metadata=_help("explicit TMAug: fraction of its image tokens affected"))
    tmaug_mode: Literal["drop", "zero"] = field(default="drop", metadata=_help(
        "explicit TMAug: remove the tokens (the paper) or zero their embeddings (the seed guide)"))

    def __post_init__(self) -> None:
        if self.use_CoT:
            raise ConfigError(
                "use_CoT is not supported: upstream's implementation stops with `assert False` on the first answer "
                "that has a 'reason' and changes nothing otherwise, so there is no behaviour to reproduce; put the "
                "reasoning into the answer's 'value' instead")
        if self.allow_overflow:
            raise ConfigError(
                "allow_overflow is not supported: upstream then cuts samples at max_packed_tokens and trains the rest "
                "of a sample, without its beginning, in another packed sequence; vitp never cuts a sample")
        if not 0.0 <= self.TSAug_prob <= 1.0:
            raise ConfigError(f"TSAug_prob must be in [0, 1], got {self.TSAug_prob}")
        for name in ("num_images_expected", "max_packed_tokens", "max_buffer_size", "log_freq"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.use_packed_ds and self.max_packed_tokens < self.max_seq_length:
            raise ConfigError(
                f"max_packed_tokens {self.max_packed_tokens} is below max_seq_length {self.max_seq_length}: a sample "
                "must fit into a packed sequence (upstream would cut it across two)")
        self.tmaug()  # validated now, not after the model is built
        if self.tmaug_mode not in MODES:
            raise ConfigError(f"tmaug_mode must be one of {MODES}")

    def weighs_samples(self) -> bool:
        """Whether the batches carry loss_reduction's per-sample weights (and loss_reduction_all_gather
        applies): upstream weighs packed batches only and takes a plain token mean of padded ones."""
        return self.use_packed_ds or self.loss_reduction_padded

    def tmaug(self) -> TMAugConfig:
        try:
            if self.TMAug_prob:
                if self.tmaug_prob or self.tmaug_ratio:
                    raise ConfigError("give either TMAug_prob (upstream) or tmaug_prob/tmaug_ratio, not both")
                return TMAugConfig.from_upstream(self.TMAug_prob)
            return TMAugConfig(prob=self.tmaug_prob, ratio=self.tmaug_ratio, mode=self.tmaug_mode)
        except ValueError as err:
            raise ConfigError(str(err)) from None


NO_EVALUATION = "nothing is evaluated: vitp pretrain has no evaluation set (upstream passes none either)"
# Fields that change nothing, as in upstream, and why (reported when set to a value other than the default).
NO_EFFECT = {
    "min_num_frame": "it applies to video samples only (upstream ignores it for images; vitp refuses video lines)",
    "max_num_frame": "it applies to video samples only (upstream ignores it for images; vitp refuses video lines)",
    "use_mps_device": "deprecated in transformers 4.37 already (MPS is used whenever it is available)",
    "mp_parameters": "SageMaker's launcher option, ignored by the Trainer (also in transformers 4.37)",
    "ray_scope": "used by hyperparameter search only",
    "include_tokens_per_second": "vitp logs tokens_per_second on every log line anyway",
    "use_cache": "training never builds a key-value cache",
    "remove_unused_columns": "vitp's batches carry only what the model and trainer use",
    **{name: NO_EVALUATION for name in (
        "per_device_eval_batch_size", "per_gpu_eval_batch_size", "eval_steps", "eval_delay", "eval_accumulation_steps",
        "eval_do_concat_batches", "eval_use_gather_object", "prediction_loss_only", "include_for_metrics",
        "include_inputs_for_metrics", "batch_eval_metrics", "bf16_full_eval", "fp16_full_eval", "jit_mode_eval",
        "use_legacy_prediction_loop", "label_names", "greater_is_better")},
}


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """transformers' TrainingArguments, plus the transformers 4.37 fields upstream's scripts may use."""

    # vitp trains when asked to run: only an explicit `--do_train False` (upstream: build, then exit) is refused
    do_train: bool | None = field(default=None, metadata=_help("must not be False: vitp pretrain trains"))
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "start afresh: remove the output directory's checkpoints instead of resuming from them"))
    evaluation_strategy: str | None = field(default=None, metadata=_help("transformers 4.x name of eval_strategy"))
    warmup_ratio: float = field(default=0.0, metadata=_help("warm-up as a fraction of the training steps"))
    group_by_length: bool = field(default=False, metadata=_help(
        "length-grouped batches (upstream's sampler); transformers 5: train_sampling_strategy group_by_length"))
    logging_dir: str | None = field(default=None, metadata=_help("TensorBoard folder (default: output_dir/runs)"))
    per_gpu_train_batch_size: int | None = field(default=None, metadata=_help("old name of per_device_train_batch_size"))
    per_gpu_eval_batch_size: int | None = field(default=None, metadata=_help("old name of per_device_eval_batch_size"))
    no_cuda: bool = field(default=False, metadata=_help("old name of use_cpu"))
    adafactor: bool = field(default=False, metadata=_help("old spelling of optim adafactor"))
    torchdynamo: str | None = field(default=None, metadata=_help("old name of torch_compile_backend"))
    fsdp_min_num_params: int = field(default=0, metadata=_help("old place of fsdp_config min_num_params"))
    fsdp_transformer_layer_cls_to_wrap: str | None = field(default=None, metadata=_help(
        "old place of fsdp_config transformer_layer_cls_to_wrap"))
    dispatch_batches: bool | None = field(default=None, metadata=_help("old place of accelerator_config dispatch_batches"))
    split_batches: bool | None = field(default=None, metadata=_help("old place of accelerator_config split_batches"))
    push_to_hub_model_id: str | None = field(default=None, metadata=_help("old name of hub_model_id"))
    push_to_hub_organization: str | None = field(default=None, metadata=_help("old: organisation of hub_model_id"))
    push_to_hub_token: str | None = field(default=None, metadata=_help("old name of hub_token"))
    save_safetensors: bool = field(default=True, metadata=_help("vitp writes safetensors only"))
    use_ipex: bool = field(default=False, metadata=_help("not supported (removed from transformers 5)"))
    half_precision_backend: str = field(default="auto", metadata=_help("'auto' (torch.amp); apex is not supported"))
    fp16_backend: str = field(default="auto", metadata=_help("old name of half_precision_backend"))
    fp16_opt_level: str = field(default="O1", metadata=_help("apex only; not supported"))
    tpu_num_cores: int | None = field(default=None, metadata=_help("TPUs are not supported"))
    tpu_metrics_debug: bool = field(default=False, metadata=_help("TPUs are not supported"))
    past_index: int = field(default=-1, metadata=_help("memory of XLNet-like models; not supported"))
    use_mps_device: bool = field(default=False, metadata=_help(NO_EFFECT["use_mps_device"]))
    jit_mode_eval: bool = field(default=False, metadata=_help(NO_EVALUATION))
    use_legacy_prediction_loop: bool = field(default=False, metadata=_help(NO_EVALUATION))
    include_inputs_for_metrics: bool = field(default=False, metadata=_help(NO_EVALUATION))
    include_tokens_per_second: bool = field(default=False, metadata=_help(NO_EFFECT["include_tokens_per_second"]))
    mp_parameters: str = field(default="", metadata=_help(NO_EFFECT["mp_parameters"]))
    ray_scope: str = field(default="last", metadata=_help(NO_EFFECT["ray_scope"]))
    # vitp's own
    loss_normalization: Literal["step", "micro_batch"] = field(default="step", metadata=_help(
        "step: divide the loss by the supervised tokens (loss weights) of the whole optimizer step, over all ranks "
        "(transformers 5's rule: every token weighs the same); micro_batch: each micro-batch's own mean, divided by "
        "the accumulation steps (upstream's rule under transformers 4.37: every micro-batch weighs the same)"))

    def __post_init__(self) -> None:
        self._refuse_unsupported()
        self._map_legacy_fields()
        self._torchrun_on_cpus()
        try:
            super().__post_init__()
        except (ValueError, OSError) as err:  # transformers' own checks: the message names the field
            raise ConfigError(str(err)) from None

    def _refuse_unsupported(self) -> None:
        if not self.output_dir:
            raise ConfigError("output_dir is required")
        if self.do_train is False:
            raise ConfigError("do_train False: upstream then loads the model and data and exits without training; "
                              "vitp pretrain only trains (leave it out or set it True)")
        evaluation = self.evaluation_strategy or self.eval_strategy
        wants_evaluation = {
            "do_eval": self.do_eval, "do_predict": self.do_predict, "eval_on_start": self.eval_on_start,
            "load_best_model_at_end": self.load_best_model_at_end,
            "metric_for_best_model": self.metric_for_best_model is not None,
            f"eval_strategy {evaluation}": str(getattr(evaluation, "value", evaluation)) != "no",
        }
        for name, wanted in wants_evaluation.items():
            if wanted:
                raise ConfigError(f"{name}: vitp pretrain has no evaluation set (upstream's scripts pass none either)")
        if self.evaluation_strategy and str(getattr(self.eval_strategy, "value", self.eval_strategy)) != "no":
            raise ConfigError("give evaluation_strategy (transformers 4) or eval_strategy (5), not both")
        refused = {
            "save_safetensors False": (not self.save_safetensors, "vitp writes weights as safetensors only"),
            "use_ipex": (self.use_ipex, "Intel Extension for PyTorch was removed from transformers 5"),
            "apex": ("apex" in (self.half_precision_backend, self.fp16_backend) or self.fp16_opt_level != "O1",
                     "NVIDIA apex mixed precision is not supported; bf16/fp16 use torch.amp"),
            "tpu_num_cores/tpu_metrics_debug": (self.tpu_num_cores is not None or self.tpu_metrics_debug,
                                                "TPUs are not supported"),
            "past_index": (self.past_index >= 0, "models with memories (XLNet, Transformer-XL) are not trained here"),
            "warmup_ratio": (not 0.0 <= self.warmup_ratio < 1.0, f"must be in [0, 1), got {self.warmup_ratio}"),
        }
        for name, hint in (("deepspeed", "configs/zero1.json is ViTP's"), ("fsdp_config", "see configs/fsdp.json")):
            value = getattr(self, name)
            if isinstance(value, str) and not value.lstrip().startswith("{") and not Path(value).is_file():
                raise ConfigError(f"{name} {value}: no such file ({hint})")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name, (wrong, reason) in refused.items():
            if wrong:
                raise ConfigError(f"{name}: {reason}")

    def _torchrun_on_cpus(self) -> None:
        """Processes of a torchrun launch without a CUDA GPU (tests, laptops) train data parallel over gloo.
        Set before transformers sets up the device: accelerate treats them as one distributed run only
        when told that they run on CPUs; otherwise each process trains alone, on the whole data set."""
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        if launched and not torch.cuda.is_available() and not (self.deepspeed or self.fsdp):  # those are refused later
            self.use_cpu = True
            self.ddp_backend = self.ddp_backend or "gloo"
        if self.bf16 and not torch.cuda.is_available():
            # transformers refuses bf16 without a GPU unless told the run is on CPUs, where autocast supports it
            self.use_cpu = True

    def _map_legacy_fields(self) -> None:
        """transformers 4.37's fields onto their transformers 5 successors (as 4.37 itself mapped most)."""
        if self.group_by_length and self.train_sampling_strategy not in ("group_by_length", "random"):
            raise ConfigError("give group_by_length or train_sampling_strategy, not both")
        if self.evaluation_strategy:
            self.eval_strategy = self.evaluation_strategy
        if self.per_gpu_train_batch_size:
            self.per_device_train_batch_size = self.per_gpu_train_batch_size
        if self.warmup_ratio and not self.warmup_steps:
            self.warmup_steps = self.warmup_ratio  # transformers 5 reads a value below 1 as a fraction
        if self.no_cuda:
            self.use_cpu = True
        if self.adafactor:
            self.optim = "adafactor"
        if self.torchdynamo:
            self.torch_compile, self.torch_compile_backend = True, self.torchdynamo
        if self.group_by_length:
            self.train_sampling_strategy = "group_by_length"
        if self.push_to_hub_model_id:
            organisation = f"{self.push_to_hub_organization}/" if self.push_to_hub_organization else ""
            self.hub_model_id = organisation + self.push_to_hub_model_id
        if self.push_to_hub_token:
            self.hub_token = self.push_to_hub_token
        fsdp_extra = {k: v for k, v in (("min_num_params", self.fsdp_min_num_params),
                                        ("transformer_layer_cls_to_wrap", self.fsdp_transformer_layer_cls_to_wrap)) if v}
        if fsdp_extra:
            self.fsdp_config = {**_as_dict(self.fsdp_config, "fsdp_config"), **fsdp_extra}
        accelerator_extra = {k: v for k, v in (("dispatch_batches", self.dispatch_batches),
                                               ("split_batches", self.split_batches)) if v is not None}
        if accelerator_extra:
            self.accelerator_config = {**_as_dict(self.accelerator_config, "accelerator_config"), **accelerator_extra}


def _as_dict(value: Any, name: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, str):
        try:
            text = value if value.lstrip().startswith("{") else Path(value).read_text(encoding="utf-8")
            return json.loads(text)
        except (OSError, ValueError) as err:
            raise ConfigError(f"{name} {value!r}: not a JSON object or file ({err})") from None
    raise ConfigError(f"{name}: expected a JSON object or file, got {type(value).__name__}")


ARGUMENT_CLASSES = (ModelArguments, DataTrainingArguments, TrainingArguments)


def pretrain_arguments(**values: Any) -> tuple[ModelArguments, DataTrainingArguments, TrainingArguments]:
    """The three argument objects from keyword values named as the flags (for Python callers);
    ValueError naming a value that is no argument."""
    known = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown pretraining arguments {unknown}")
    return tuple(cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.init and f.name in values})
                 for cls in ARGUMENT_CLASSES)  # type: ignore[return-value]


def ineffective_settings(*arguments: Any) -> list[str]:
    """'name=value: why it changes nothing' for every NO_EFFECT field set to a non-default value."""
    notes = []
    for group in arguments:
        defaults = {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                    for f in dataclasses.fields(group) if f.init}
        for name, reason in NO_EFFECT.items():
            if name in defaults and getattr(group, name) != defaults[name]:
                notes.append(f"{name}={getattr(group, name)!r} has no effect: {reason}")
    return notes


def validate_combination(data_args: DataTrainingArguments, training_args: TrainingArguments) -> list[str]:
    """Checks that need more than one group of arguments; returns notes on settings that change nothing."""
    if data_args.use_packed_ds and training_args.max_steps <= 0:
        raise ConfigError("use_packed_ds needs max_steps: the number of packed sequences per epoch depends on the "
                          "order samples arrive in, so epochs cannot be counted (upstream's packed scripts give max_steps)")
    if data_args.use_data_resampling and training_args.train_sampling_strategy == "group_by_length":
        raise ConfigError("use_data_resampling and group_by_length choose the order in two different ways; give one "
                          "(upstream's padded path ignores use_data_resampling)")
    if training_args.train_sampling_strategy == "batch_rebalance":
        raise ConfigError("train_sampling_strategy batch_rebalance is not supported; use group_by_length")
    notes = []
    if data_args.use_packed_ds and training_args.train_sampling_strategy != "random":
        notes.append(f"train_sampling_strategy {training_args.train_sampling_strategy} has no effect with use_packed_ds: "
                     "packing chooses the order (upstream ignores group_by_length for packed data too)")
    if data_args.loss_reduction != "token" and not data_args.weighs_samples():
        notes.append(f"loss_reduction {data_args.loss_reduction} has no effect on padded batches: their loss is the "
                     "token mean, as upstream's (loss_reduction_padded True weighs them too)")
    return notes
