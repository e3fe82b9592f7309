"""`vitp pretrain`'s arguments: every field of upstream's trainer with upstream's default, every
transformers 4.37 TrainingArguments flag accepted (the removed ones mapped), refusals with reasons,
--config under the command line, and `vitp data check` reading the same data defaults."""

import dataclasses

import pytest

from vitp.cli.train import parse_pretrain_arguments
from vitp.errors import ConfigError
from vitp.train.arguments import DataTrainingArguments, ModelArguments, ineffective_settings

# upstream's ModelArguments and DataTrainingArguments (ViTP's internvl/train/internvl_chat_finetune.py)
UPSTREAM_MODEL = dict(
    model_name_or_path=None, vision_path=None, llm_path=None, mlp_path=None, freeze_llm=False, freeze_backbone=False,
    freeze_mlp=False, unfreeze_vit_layers=0, vision_select_layer=-1, use_backbone_lora=0, use_llm_lora=0,
    unfreeze_lm_head=False, grad_checkpoint=True, drop_path_rate=0.0, ps_version="v2", use_fast_tokenizer=False,
    use_liger=False,
)
UPSTREAM_DATA = dict(
    max_seq_length=8192, force_image_size=448, down_sample_ratio=0.5, pad2square=False, conv_style="internlm2-chat",
    meta_path=None, use_data_resampling=False, dynamic_image_size=False, use_thumbnail=False, min_dynamic_patch=1,
    max_dynamic_patch=12, min_num_frame=8, max_num_frame=32, use_CoT=False, use_classifier=False, TSAug_prob=0.0,
    TMAug_prob=0.0, normalize_type="imagenet", use_packed_ds=False, num_images_expected=40, max_packed_tokens=8192,
    max_buffer_size=20, log_freq=1000, strict_mode=True, replacement=False, allow_overflow=False,
    loss_reduction="token", loss_reduction_all_gather=False,
)
# vitp's one deliberate difference: upstream's 'internlm2-chat' suits InternLM2 models only (its scripts always
# pass --conv_style); vitp takes the checkpoint's own template unless told
DIFFERENT_DEFAULTS = {"conv_style": None}
# transformers 4.37.2's TrainingArguments (the version upstream pins), every field a script may pass
TRANSFORMERS_4_37_FLAGS = """
output_dir overwrite_output_dir do_train do_eval do_predict evaluation_strategy prediction_loss_only
per_device_train_batch_size per_device_eval_batch_size per_gpu_train_batch_size per_gpu_eval_batch_size
gradient_accumulation_steps eval_accumulation_steps eval_delay learning_rate weight_decay adam_beta1 adam_beta2
adam_epsilon max_grad_norm num_train_epochs max_steps lr_scheduler_type lr_scheduler_kwargs warmup_ratio warmup_steps
log_level log_level_replica log_on_each_node logging_dir logging_strategy logging_first_step logging_steps
logging_nan_inf_filter save_strategy save_steps save_total_limit save_safetensors save_on_each_node save_only_model
no_cuda use_cpu use_mps_device seed data_seed jit_mode_eval use_ipex bf16 fp16 fp16_opt_level half_precision_backend
bf16_full_eval fp16_full_eval tf32 local_rank ddp_backend tpu_num_cores tpu_metrics_debug debug dataloader_drop_last
eval_steps dataloader_num_workers dataloader_prefetch_factor past_index run_name disable_tqdm remove_unused_columns
label_names load_best_model_at_end metric_for_best_model greater_is_better ignore_data_skip fsdp fsdp_min_num_params
fsdp_config fsdp_transformer_layer_cls_to_wrap deepspeed label_smoothing_factor optim optim_args adafactor
group_by_length length_column_name report_to ddp_find_unused_parameters ddp_bucket_cap_mb ddp_broadcast_buffers
dataloader_pin_memory dataloader_persistent_workers skip_memory_metrics use_legacy_prediction_loop push_to_hub
resume_from_checkpoint hub_model_id hub_strategy hub_token hub_private_repo hub_always_push gradient_checkpointing
gradient_checkpointing_kwargs include_inputs_for_metrics fp16_backend push_to_hub_model_id push_to_hub_organization
push_to_hub_token mp_parameters auto_find_batch_size full_determinism torchdynamo ray_scope ddp_timeout torch_compile
torch_compile_backend torch_compile_mode dispatch_batches split_batches include_tokens_per_second
include_num_input_tokens_seen neftune_noise_alpha
""".split()
NO_MODEL = ["--output_dir", "out", "--meta_path", "meta.json"]
BASE = NO_MODEL + ["--model_preset", "internvl-tiny", "--tokenizer", "tok"]


@pytest.mark.parametrize("cls, upstream", [(ModelArguments, UPSTREAM_MODEL), (DataTrainingArguments, UPSTREAM_DATA)])
def test_every_upstream_field_with_upstreams_default(cls, upstream):
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, value in upstream.items():
        assert name in defaults, name
        assert defaults[name] == DIFFERENT_DEFAULTS.get(name, value), name


def test_every_transformers_4_37_flag_is_accepted():
    from vitp.cli.train import argument_parser

    options = {option for action in argument_parser()._actions for option in action.option_strings}
    assert [name for name in TRANSFORMERS_4_37_FLAGS if f"--{name}" not in options] == []


def test_old_names_map_to_their_transformers_5_successors():
    _, _, args = parse_pretrain_arguments(BASE + [
        "--evaluation_strategy", "no", "--warmup_ratio", "0.2", "--per_gpu_train_batch_size", "3", "--no_cuda", "True",
        "--adafactor", "True", "--group_by_length", "True", "--push_to_hub_model_id", "vit", "--push_to_hub_organization",
        "lab", "--dispatch_batches", "False", "--fsdp_min_num_params", "1000", "--torchdynamo", "inductor",
    ])
    assert args.eval_strategy == "no" and args.warmup_steps == 0.2 and args.per_device_train_batch_size == 3
    assert args.use_cpu and args.optim == "adafactor" and args.train_sampling_strategy == "group_by_length"
    assert args.hub_model_id == "lab/vit" and args.accelerator_config.dispatch_batches is False
    assert args.fsdp_config["min_num_params"] == 1000 and args.torch_compile and args.torch_compile_backend == "inductor"


@pytest.mark.parametrize("flags, reason", [
    (["--save_safetensors", "False"], "safetensors only"),
    (["--use_ipex", "True"], "removed from transformers 5"),
    (["--half_precision_backend", "apex"], "apex"),
    (["--tpu_num_cores", "8"], "TPUs are not supported"),
    (["--past_index", "0"], "memories"),
    (["--load_best_model_at_end", "True"], "no evaluation set"),
    (["--do_predict", "True"], "no evaluation set"),
    (["--allow_overflow", "True"], "never cuts a sample"),
    (["--use_packed_ds", "True", "--max_packed_tokens", "100", "--max_seq_length", "200"], "must fit into a packed"),
    (NO_MODEL + ["--vision_path", "vit"], "needs both vision_path and llm_path"),
    (NO_MODEL, "give a model"),
    (["--model_name_or_path", "m"], "one model source"),
    (["--TMAug_prob", "0.5", "--tmaug_ratio", "0.5"], "either TMAug_prob"),
])
def test_unsupported_values_are_refused_with_the_reason(flags, reason):
    with pytest.raises(ConfigError, match=reason):
        parse_pretrain_arguments(flags if flags[: len(NO_MODEL)] == NO_MODEL else BASE + flags)


def test_settings_that_change_nothing_are_reported():
    arguments = parse_pretrain_arguments(BASE + ["--max_num_frame", "16", "--per_device_eval_batch_size", "4"])
    notes = ineffective_settings(*arguments)
    assert any(n.startswith("max_num_frame=16 has no effect: it applies to video samples only") for n in notes)
    assert any(n.startswith("per_device_eval_batch_size=4 has no effect: nothing is evaluated") for n in notes)
    assert ineffective_settings(*parse_pretrain_arguments(BASE)) == []


def test_config_file_values_under_the_command_line(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("max_steps: 50\nlearning_rate: 2e-5\nconv_style: Hermes-2\ngroup_by_length: true\n")
    _, data, args = parse_pretrain_arguments(BASE + ["--config", str(recipe), "--max_steps", "2"])
    assert args.max_steps == 2 and args.learning_rate == 2e-5 and data.conv_style == "Hermes-2"
    assert args.train_sampling_strategy == "group_by_length"
    recipe.write_text("max_stesp: 3\n")
    with pytest.raises(ConfigError, match=r"unknown settings 'max_stesp' \(did you mean 'max_steps'\?\)"):
        parse_pretrain_arguments(BASE + ["--config", str(recipe)])
    recipe.write_text("conv_style: vicuna\n")
    with pytest.raises(ConfigError, match="'vicuna' is not one of internvl2_5, Hermes-2"):
        parse_pretrain_arguments(BASE + ["--config", str(recipe)])


def test_data_check_reads_the_training_defaults():
    from vitp.cli.data import check_parser

    data_args, _ = check_parser().parse_args_into_dataclasses([], look_for_args_file=False)
    assert dataclasses.asdict(data_args) == dataclasses.asdict(DataTrainingArguments())


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="for machines without a CUDA GPU")
def test_torchrun_processes_on_cpus_train_data_parallel(monkeypatch):
    """Without use_cpu accelerate would run each torchrun process as a run of its own (each on all the data)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("transformers.TrainingArguments._setup_devices", None)  # not set up: no process group here
    _, _, args = parse_pretrain_arguments(BASE)
    assert args.use_cpu and args.ddp_backend == "gloo" and args.loss_normalization == "step"
