"""ViTP pretraining (stage 1), on the transformers Trainer, with upstream's arguments.

Read top to bottom: load (or compose, or build) the model and tokenizer, choose what trains (freezing,
LoRA), build the dataset (padded or packed batches), configure the Trainer (one process, torchrun,
DeepSpeed ZeRO or FSDP all go through it), resume if the output folder holds checkpoints, train, save
a transformers-native InternVL directory and draw the loss curve.

What the Trainer does not do, ``VitpTrainer`` adds: checkpoints written as transformers InternVL
directories (adapters merged; read back strictly on resume), upstream's samplers and packing, the
loss normalised over the weights of a whole optimizer step or, as upstream, of each micro-batch
(``loss_normalization``), and logs of tokens/s, TMAug statistics and the samples the data checks
dropped (each bad line reported once).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, SequentialSampler
from transformers import Trainer, TrainerCallback, TrainerState, set_seed

from vitp.data.check import validate_data_settings
from vitp.data.dataset import Collator, InstructionDataset, data_settings
from vitp.data.meta import read_meta, require_samples_per_epoch
from vitp.data.tokenizer import load_tokenizer
from vitp.errors import ConfigError, WeightFormatError
from vitp.model.checkpoint import build_vlm, load_vlm, load_vlm_weights, save_vlm
from vitp.model.projector import load_projector_weights
from vitp.model.vlm import VisionLanguageModel, count_samples, use_packed_attention
from vitp.progress import bars_shown
from vitp.tensor_io import open_tensor_source
from vitp.train import lora
from vitp.train.arguments import (
    DataTrainingArguments,
    ModelArguments,
    TrainingArguments,
    ineffective_settings,
    validate_combination,
)
from vitp.train.packing import PackedBatchSampler, PackedCollator, PackedItems
from vitp.train.plots import plot_loss_curve
from vitp.train.sampling import LengthGroupedSampler, ResamplingSampler, estimated_lengths

logger = logging.getLogger("vitp")
TRAINER_STATE = "trainer_state.json"


def pretrain(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: TrainingArguments) -> Path:
    for note in ineffective_settings(model_args, data_args, training_args) + validate_combination(data_args, training_args):
        logger.warning("%s", note)
    if not data_args.meta_path:
        raise ConfigError("meta_path is required: the meta JSON of the training data")
    if data_args.loss_reduction_all_gather:  # the loss weights summed over every rank, as upstream's flag asks
        training_args.average_tokens_across_devices = True
    check_parallelism(training_args)
    check_output_dir(training_args)
    if not bars_shown():  # a captured log (or --no_progress): the Trainer prints its log lines instead of a bar
        training_args.disable_tqdm = True
    output = Path(training_args.output_dir)  # created once every setting is accepted, so a refusal leaves nothing
    resume = resume_checkpoint(training_args)
    done = resume is not None and training_args.max_steps > 0 and global_step(resume) >= training_args.max_steps
    if done:  # a re-run of a finished run: training on would step past max_steps and rotate checkpoints out
        logger.warning("%s already reached max_steps %d: nothing to train (raise max_steps to go on)",
                       resume, training_args.max_steps)
        if (output / "model.safetensors").is_file():
            return output
    set_seed(training_args.seed)
    model, tokenizer = load_model(model_args, data_args)
    if done:  # the run was stopped after its last checkpoint, before the final save: write it from there
        load_vlm_weights(model, Path(resume))
        if is_main_process():
            save_vlm(model, output, tokenizer)
        return output
    choose_trainable(model, model_args)
    if model_args.use_liger or training_args.use_liger_kernel:
        apply_liger_kernels(model)
        training_args.use_liger_kernel = False  # applied here: the Trainer's version skips non-transformers models
    if model_args.grad_checkpoint:
        model.set_gradient_checkpointing(True)
    model.label_smoothing = training_args.label_smoothing_factor
    model.tsaug_prob = data_args.TSAug_prob

    settings = data_settings(data_args, model.vlm_config.vision.image_size, model.vlm_config.num_image_token)
    specs = read_meta(data_args.meta_path)
    validate_data_settings(settings, model.vlm_config.vision.patch_size, specs)
    dataset = InstructionDataset(specs, tokenizer, settings, train=True, replace_bad=not data_args.use_packed_ds)
    require_samples_per_epoch(specs, [len(index) for index in dataset.indexes])
    # upstream weighs the samples of packed batches only; padded ones take a plain token mean
    loss_reduction = data_args.loss_reduction if data_args.weighs_samples() else "token"
    if data_args.use_packed_ds:
        use_packed_attention(model)
        strict = data_args.strict_mode
        collator = PackedCollator(tokenizer.pad_token_id, loss_reduction,
                                  strict_tokens=data_args.max_packed_tokens if strict else None,
                                  strict_tiles=data_args.num_images_expected if strict else None,
                                  tile_size=settings.force_image_size)
    else:
        collator = Collator(tokenizer.pad_token_id, loss_reduction)
        warn_if_batch_exceeds_data(len(dataset), training_args)

    prepare_output_dir(training_args)
    trainer = VitpTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=collator,
                          processing_class=tokenizer, data_args=data_args, callbacks=[LogFirstAndLastStep()])
    if resume:
        logger.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=resume)
    # The Trainer counts max_steps x the nominal batch; these are the samples the steps really held.
    result.metrics["train_samples_per_second"] = round(trainer.samples_seen() / max(result.metrics["train_runtime"], 1e-9), 3)
    trainer.save_model(training_args.output_dir)
    trainer.log_metrics("train", result.metrics)  # as upstream: train_results.json and the final trainer state
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()
    if trainer.is_world_process_zero():
        plot_loss_curve(trainer.state.log_history, output / "loss.png")
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return output


def check_parallelism(args: TrainingArguments) -> None:
    """Refuse a sharding request that would otherwise be ignored: on CPUs accelerate runs every
    process as plain DDP whatever fsdp says, so a user would get a full model copy per process."""
    if args.fsdp and args.deepspeed:
        raise ConfigError("give deepspeed or fsdp, not both")
    if args.deepspeed and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'")
    cuda = torch.cuda.is_available()
    if (args.fsdp or args.deepspeed) and not cuda:
        name = "fsdp" if args.fsdp else "deepspeed"
        raise ConfigError(
            f"{name} shards the model over GPUs, and no CUDA GPU is visible: on CPUs the processes would run as "
            f"plain data parallel, each with a full copy of the model. Leave out {name} to train that way."
        )
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cuda and torch.cuda.device_count() > 1 and not distributed and not args.use_cpu:
        raise ConfigError(f"{torch.cuda.device_count()} GPUs are visible to one process: launch with "
                          "`torchrun --nproc_per_node N -m vitp.cli pretrain ...` (or set CUDA_VISIBLE_DEVICES)")
    if not cuda:  # pinned memory needs an accelerator; asking for it on CPUs prints a warning every epoch
        args.dataloader_pin_memory = False
    # transformers 5 reads the TensorBoard folder from the environment; set it for every run (not
    # setdefault), or a second run in the same process would write into the first one's folder.
    os.environ["TENSORBOARD_LOGGING_DIR"] = args.logging_dir or str(Path(args.output_dir) / "runs")
    if args.ddp_find_unused_parameters is None:
        args.ddp_find_unused_parameters = False  # every trainable parameter gets a gradient (see embed_inputs)


def load_model(model_args: ModelArguments, data_args: DataTrainingArguments) -> tuple[VisionLanguageModel, Any]:
    """A checkpoint directory, a model composed of a ViT and an LLM, or a preset from scratch; then
    upstream's model settings (tile size, feature layer, template, projector weights)."""
    tmaug = data_args.tmaug()
    image_size = data_args.force_image_size
    if model_args.model_name_or_path:
        model, tokenizer = load_vlm(model_args.model_name_or_path, tmaug=tmaug, drop_path_rate=model_args.drop_path_rate,
                                    image_size=image_size, use_fast_tokenizer=model_args.use_fast_tokenizer)
    elif model_args.vision_path:
        from vitp.model.checkpoint import compose_vlm

        model, tokenizer = compose_vlm(
            model_args.vision_path, model_args.llm_path, model_args.mlp_path, tmaug=tmaug,
            drop_path_rate=model_args.drop_path_rate, image_size=image_size, downsample_ratio=data_args.down_sample_ratio,
            select_layer=model_args.vision_select_layer, use_fast_tokenizer=model_args.use_fast_tokenizer,
        )
    else:
        tokenizer = load_tokenizer(model_args.tokenizer, use_fast=model_args.use_fast_tokenizer)
        model = build_vlm(model_args.model_preset, tokenizer, tmaug, drop_path_rate=model_args.drop_path_rate,
                          image_size=image_size)
    if model.vlm_config.downsample_ratio != data_args.down_sample_ratio:  # upstream asserts the same
        raise ConfigError(f"down_sample_ratio {data_args.down_sample_ratio} differs from the model's "
                          f"{model.vlm_config.downsample_ratio} (the projector's shapes depend on it)")
    try:
        model.vision_model.resolve_layer(model_args.vision_select_layer)  # validates the index
    except ValueError as err:
        raise ConfigError(f"vision_select_layer: {err}") from None
    template = data_args.conv_style or model.vlm_config.template
    if data_args.use_classifier and template != "internvl2_5":
        raise ConfigError(f"use_classifier: upstream computes the choice loss for the internvl2_5 template only, and "
                          f"this run uses {template}")
    data_args.conv_style = template  # the dataset and the saved checkpoint use the same one
    model.vlm_config = dataclasses.replace(model.vlm_config, select_layer=model_args.vision_select_layer,
                                          template=template)
    if model_args.mlp_path and not model_args.vision_path:  # upstream loads it over any model's projector
        load_projector_weights(model.mlp1, model_args.mlp_path)
    logger.info("chat template: %s", template)
    return model, tokenizer


def choose_trainable(model: VisionLanguageModel, args: ModelArguments) -> None:
    """Upstream's order: freeze, wrap LoRA adapters (which freeze the rest of their module), freeze the
    projector, unfreeze ViT layers; ``unfreeze_lm_head`` comes after LoRA so that it takes effect."""
    model.freeze(llm=args.freeze_llm, backbone=args.freeze_backbone)
    if args.use_backbone_lora:
        lora.wrap_backbone_lora(model, args.use_backbone_lora)
    if args.use_llm_lora:
        lora.wrap_llm_lora(model, args.use_llm_lora)
    if args.unfreeze_lm_head:
        model.language_model.get_output_embeddings().weight.requires_grad_(True)
    if args.freeze_mlp:
        model.mlp1.requires_grad_(False)
    if args.unfreeze_vit_layers:
        depth = len(model.vision_model.blocks)
        if abs(args.unfreeze_vit_layers) > depth:
            raise ConfigError(f"unfreeze_vit_layers {args.unfreeze_vit_layers}: the ViT has {depth} layers")
        for block in model.vision_model.blocks[args.unfreeze_vit_layers:]:
            block.requires_grad_(True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not trainable:
        raise ConfigError("freeze_llm, freeze_backbone and freeze_mlp together leave nothing to train "
                          "(add use_llm_lora or use_backbone_lora to train adapters)")
    logger.info("trainable parameters: %d of %d", trainable, sum(p.numel() for p in model.parameters()))


def apply_liger_kernels(model: VisionLanguageModel) -> None:
    """Liger's fused Triton kernels (RMSNorm, RoPE, SwiGLU) in the LLM, as upstream's --use_liger."""
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise ConfigError("use_liger needs the liger-kernel package (CUDA GPUs): pip install 'vitp[liger]'") from None
    with lora.without_peft_wrappers(model):
        _apply_liger_kernel_to_instance(model=model.language_model)


def check_output_dir(args: TrainingArguments) -> None:
    """Refuse an output_dir that is a file, before anything is loaded."""
    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"output_dir {output} is a file, not a directory")


def warn_if_batch_exceeds_data(num_samples: int, args: TrainingArguments) -> None:
    """A batch larger than the data set holds the whole data set: every micro-batch is an epoch and a
    step trains on fewer samples than its nominal batch. Say how many it really holds."""
    nominal = args.per_device_train_batch_size * args.world_size
    if num_samples >= nominal:
        return
    accumulation = args.gradient_accumulation_steps
    logger.warning(
        "per_device_train_batch_size %d x %d process(es) is larger than the data set's %d samples: every batch is "
        "the whole data set (one epoch), so a step trains on %d samples, not %d", args.per_device_train_batch_size,
        args.world_size, num_samples, num_samples * accumulation, nominal * accumulation,
    )


def prepare_output_dir(args: TrainingArguments) -> Path:
    """The output directory (checked by check_output_dir), created; with overwrite_output_dir an earlier
    run's checkpoints are removed first, or a later run without the flag would resume from them."""
    output = Path(args.output_dir)
    if args.overwrite_output_dir and is_main_process():
        for old in checkpoints(output):
            shutil.rmtree(old)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    output.mkdir(parents=True, exist_ok=True)
    return output


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch (or the only process), before the Trainer exists to say so."""
    return int(os.environ.get("RANK", "0")) == 0


def checkpoints(output: Path) -> list[Path]:
    """checkpoint-N directories of a run, newest first."""
    found = [path for path in output.glob("checkpoint-*") if path.is_dir() and path.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda path: int(path.name.split("-", 1)[1]), reverse=True)


def resume_checkpoint(args: TrainingArguments) -> str | None:
    """An explicit resume_from_checkpoint, else the newest complete checkpoint-N in output_dir (as
    upstream, which takes the newest; one a kill left half-written is skipped with a warning)."""
    if args.resume_from_checkpoint:
        problem = checkpoint_problem(Path(args.resume_from_checkpoint))
        if problem:
            raise ConfigError(f"resume_from_checkpoint {args.resume_from_checkpoint}: {problem}")
        return args.resume_from_checkpoint
    output = Path(args.output_dir)
    if args.overwrite_output_dir or not output.is_dir():
        return None
    for candidate in checkpoints(output):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return str(candidate)
        logger.warning("not resuming from %s: %s", candidate, problem)
    return None


def checkpoint_problem(directory: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a save interrupted by a kill), or None."""
    if not directory.is_dir():
        return "not a directory"
    if global_step(directory) is None:
        return f"{TRAINER_STATE} is missing or unreadable (the save was interrupted)"
    for weights in (directory / "model.safetensors", directory / lora.TRAINABLE_FILE):
        if weights.is_file():
            try:
                open_tensor_source(weights)  # safetensors checks that the data covers what the header names
            except WeightFormatError as err:
                return f"{weights.name} is truncated or unreadable ({err})"
    optimizer = directory / "optimizer.pt"
    if optimizer.exists() and optimizer.stat().st_size == 0:
        return "optimizer.pt is empty (the save was interrupted)"
    return None


def global_step(checkpoint: str | Path) -> int | None:
    """The step a checkpoint was saved at, from its trainer state; None if that is missing or unreadable."""
    try:
        return int(TrainerState.load_from_json(str(Path(checkpoint) / TRAINER_STATE)).global_step)
    except (OSError, ValueError, TypeError):
        return None


class LogFirstAndLastStep(TrainerCallback):
    """Log the first and the last optimizer step besides every logging_steps: a run shorter than
    logging_steps would otherwise log no loss at all (and draw no loss curve)."""

    def on_step_end(self, args, state, control, **kwargs):
        if args.logging_strategy != "no" and state.global_step in (1, state.max_steps):
            control.should_log = True
        return control


WINDOW_KEYS = ("answer_tokens", "sequence_tokens", "tmaug_samples", "tmaug_tokens", "tsaug_samples", "samples")


class VitpTrainer(Trainer):
    """The transformers Trainer with vitp's data order, checkpoints and logs."""

    def __init__(self, *args: Any, data_args: DataTrainingArguments, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.data_args = data_args
        self.label_smoother = None  # the model applies label_smoothing_factor to the answer tokens itself
        self._samples_in_step: int | torch.Tensor | None = None
        # step: the loss is already divided by the whole step's weights; micro_batch: the Trainer divides each
        # micro-batch's mean by the accumulation steps (see _get_num_items_in_batch)
        self.loss_is_scaled_for_ga = self.args.loss_normalization == "step"
        self._window = dict.fromkeys(WINDOW_KEYS, 0)
        self._window_start = time.perf_counter()
        self._dropped_total = 0
        self._samples_total = 0  # samples this process trained on (packed or padded, whatever the batch size)
        self._reported_lines: set[str] = set()

    # ----------------------------------------------------------------------------------------------
    # Data: upstream's orders, packed batches; nothing removed from vitp's batches

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        strategy = self.args.train_sampling_strategy
        if strategy == "group_by_length":
            lengths = estimated_lengths(dataset, self.args.length_column_name)
            return LengthGroupedSampler(lengths, self.args.train_batch_size,
                                        self.args.world_size * self.args.gradient_accumulation_steps, seed)
        if self.data_args.use_data_resampling:
            return ResamplingSampler(dataset.dataset_sizes(), seed)
        if strategy == "sequential":
            return SequentialSampler(dataset)
        return super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self) -> DataLoader:
        if not self.data_args.use_packed_ds:
            return super().get_train_dataloader()
        args, data = self.args, self.data_args
        sampler = PackedBatchSampler(
            self.train_dataset, args.per_device_train_batch_size, data.max_packed_tokens, data.num_images_expected,
            data.max_buffer_size, data.replacement, data.use_data_resampling,
            seed=args.data_seed if args.data_seed is not None else args.seed, log_every=data.log_freq,
        )
        loader = DataLoader(PackedItems(self.train_dataset), batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                            persistent_workers=args.dataloader_persistent_workers,
                            prefetch_factor=args.dataloader_prefetch_factor)
        return self.accelerator.prepare(loader)

    def _get_collator_with_removed_columns(self, data_collator, description=None):
        return data_collator  # vitp's batches carry only what the model and the trainer use

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """What the loss of each micro-batch of an optimizer step is divided by (``loss_normalization``).

        ``step``: the summed loss weights of all the step's micro-batches (its supervised tokens for
        loss_reduction token), summed over the ranks with average_tokens_across_devices; the choice loss is
        divided by the step's samples. Returned, so that the Trainer divides by nothing else.

        ``micro_batch``, upstream's rule. ViTP's ``internvl/model/internvl_chat/modeling_internvl_chat.py``
        (``InternVLChatModel.forward``) computes the loss of a micro-batch as

        * padded batches: the mean cross-entropy over its supervised tokens (``CrossEntropyLoss()``), plus the
          choice loss of its one sample (use_classifier);
        * packed batches: ``sum(w * ce) / sum(w)``, ``w`` being ``len2weight`` of each token's sample
          (``internvl/train/internvl_chat_finetune.py``: 1, 1/n or 1/sqrt(n)); with loss_reduction_all_gather,
          ``sum(w)`` is first averaged over the ranks (``dist.all_reduce(..., op=ReduceOp.AVG)``).

        transformers 4.37's ``Trainer.training_step`` hands that loss to accelerate's ``backward``, which divides
        it by ``gradient_accumulation_steps`` (DeepSpeed's engine does the same), and DDP (or ZeRO) averages the
        gradients over the ranks: a step's gradient is the mean over ranks of the sum over micro-batches of
        ``grad(loss) / gradient_accumulation_steps``, and the logged loss that mean of the losses. Here this
        returns None: the model divides each micro-batch by its own weights and the Trainer divides by the
        accumulation steps; with loss_reduction_all_gather (where the batches weigh samples, as upstream's
        packed ones) each micro-batch gets its rank-averaged weights as ``num_items_in_batch``.
        """
        weights = torch.stack([batch["loss_weight"][:, 1:].sum() for batch in batch_samples]).to(device)
        distributed = self.args.world_size > 1
        if self.args.loss_normalization == "micro_batch":
            self._samples_in_step = None  # the choice loss is divided by each micro-batch's own samples
            if self.data_args.loss_reduction_all_gather and self.data_args.weighs_samples() and distributed:
                averaged = self.accelerator.reduce(weights, reduction="mean")
                for batch, total in zip(batch_samples, averaged):
                    batch["num_items_in_batch"] = total
            return None
        weights = weights.sum()
        samples = torch.tensor(sum(count_samples(b["attention_mask"], b.get("segment_ids")) for b in batch_samples),
                               dtype=torch.float32, device=device)
        if self.args.average_tokens_across_devices and distributed:
            weights = self.accelerator.gather(weights).sum()
            samples = self.accelerator.gather(samples).sum()
        self._samples_in_step = samples
        return weights

    # ----------------------------------------------------------------------------------------------
    # Loss and logs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._record_drops(inputs.pop("dropped", []))
        if inputs.get("classify"):
            inputs["num_samples_in_batch"] = self._samples_in_step
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            self._window["answer_tokens"] += outputs.answer_tokens or 0
            self._window["sequence_tokens"] += outputs.sequence_tokens or 0
            samples = count_samples(inputs["attention_mask"], inputs.get("segment_ids"))
            self._window["samples"] += samples
            self._samples_total += samples
            for key, value in (outputs.tmaug or {}).items():
                if key != "samples":
                    self._window[key] += value
        return (loss, outputs) if return_outputs else loss

    def _record_drops(self, dropped: list[tuple[str, str, str]]) -> None:
        self._dropped_total += len(dropped)
        for where, kind, reason in dropped:
            if where not in self._reported_lines:
                self._reported_lines.add(where)
                logger.warning("skipped %s (%s): %s", where, kind, reason)

    def samples_seen(self) -> int:
        """Samples trained on in this run, summed over every process (a collective under torchrun)."""
        total = torch.tensor(float(self._samples_total), dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        return int(total.item())

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log line: add this window's throughput and augmentation figures
            totals = torch.tensor([self._window[k] for k in WINDOW_KEYS] + [self._dropped_total],
                                  dtype=torch.float64, device=self.args.device)
            if self.args.world_size > 1:
                totals = self.accelerator.reduce(totals, reduction="sum")
            window = dict(zip(WINDOW_KEYS + ("dropped",), totals.tolist()))
            elapsed = max(time.perf_counter() - self._window_start, 1e-9)
            logs["tokens_per_second"] = round(window["sequence_tokens"] / elapsed, 1)
            logs["answer_tokens"] = int(window["answer_tokens"])
            model = self.accelerator.unwrap_model(self.model)
            if model.tmaug.active:
                logs["tmaug_sample_fraction"] = round(window["tmaug_samples"] / max(window["samples"], 1), 4)
                logs["tmaug_tokens"] = int(window["tmaug_tokens"])
            if model.tsaug_prob:
                logs["tsaug_sample_fraction"] = round(window["tsaug_samples"] / max(window["samples"], 1), 4)
            logs["dropped_samples"] = int(window["dropped"])
            self._window = dict.fromkeys(WINDOW_KEYS, 0)
            self._window_start = time.perf_counter()
        super().log(logs, start_time)

    # ----------------------------------------------------------------------------------------------
    # Checkpoints

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Every checkpoint is a transformers-native InternVL directory (LoRA merged in, the adapters
        beside it)."""
        if not self.args.should_save:
            return
        output_dir = Path(output_dir or self.args.output_dir)
        model = self.accelerator.unwrap_model(self.model)
        if not lora.uses_lora(model):
            save_vlm(model, output_dir, self.processing_class, state_dict=state_dict)
            return
        merged = lora.merged_state_dict(model, state_dict)
        lora.save_adapters(model, output_dir)
        with lora.without_peft_wrappers(model):
            save_vlm(model, output_dir, self.processing_class, state_dict=merged)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Resume reads the directory `_save` wrote, strictly (DeepSpeed/FSDP keep their own formats)."""
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model or self.model
        if lora.uses_lora(model):
            lora.load_trainable(model, Path(resume_from_checkpoint))
        else:
            load_vlm_weights(model, Path(resume_from_checkpoint))
