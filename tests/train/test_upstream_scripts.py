"""Upstream's launch scripts run under `vitp pretrain` with their flags verbatim.

The scripts are in upstream_scripts/ as published (ViTP's ViTP_configs, InternVL's 2nd_finetune for
InternVL2-1B and InternVL2.5-1B, full and LoRA). The test reads the flags that follow
``internvl/train/internvl_chat_finetune.py`` and changes only paths, sizes and what a CPU cannot do
(bf16, DeepSpeed); the run must finish and its checkpoints must load in transformers.

ViTP's remote-sensing script runs a second time with the one flag the README adds to reproduce
upstream's loss rule exactly (``--loss_normalization micro_batch``).

The 2B scripts run on a tiny InternLM2 checkpoint in InternLM2's remote-code layout, with its
sentencepiece tokenizer (``use_fast_tokenizer False``, ``internlm2-chat`` or ``internvl2_5`` template).
"""

import json
import shlex
from pathlib import Path

import pytest
import torch
from transformers import InternVLForConditionalGeneration

from vitp.cli import main
from vitp.model.checkpoint import load_vlm

SCRIPTS = Path(__file__).parent / "upstream_scripts"
CASES = [
    ("InternVL_1b_remote_sensing_ViTP.sh", "tiny_qwen2_checkpoint"),
    ("InternVL_1b_remote_sensing_ViTP.sh --loss_normalization micro_batch", "tiny_qwen2_checkpoint"),  # flags added
    ("InternVL_1b_general_ViTP.sh", "tiny_qwen2_checkpoint"),
    ("InternVL_1b_medical_ViTP.sh", "tiny_qwen2_checkpoint"),
    ("internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_full.sh", "tiny_qwen2_checkpoint"),
    ("internvl2_1b_qwen2_0_5b_dynamic_res_2nd_finetune_lora.sh", "tiny_qwen2_checkpoint"),
    ("internvl2_5_1b_dynamic_res_2nd_finetune_full.sh", "tiny_qwen2_checkpoint"),
    ("internvl2_5_1b_dynamic_res_2nd_finetune_lora.sh", "tiny_qwen2_checkpoint"),
    ("internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune_full.sh", "tiny_internlm2_checkpoint"),
    ("internvl2_2b_internlm2_1_8b_dynamic_res_2nd_finetune_lora.sh", "tiny_internlm2_checkpoint"),
    ("internvl2_5_2b_dynamic_res_2nd_finetune_full.sh", "tiny_internlm2_checkpoint"),
    ("internvl2_5_2b_dynamic_res_2nd_finetune_lora.sh", "tiny_internlm2_checkpoint"),
]
# sizes for a CPU and a data set of 6 samples (a checkpoint every 2 steps, so that one is written)
SIZES = {"--max_steps": "2", "--save_steps": "2", "--force_image_size": "56", "--per_device_train_batch_size": "2",
         "--gradient_accumulation_steps": "1", "--dataloader_num_workers": "0"}
CPU = {"--bf16": "False", "--deepspeed": None}  # None: the flag is left out


def script_flags(name: str) -> list[str]:
    """The arguments the script passes to upstream's trainer, as the shell would split them (variables
    such as ${OUTPUT_DIR} stay as written)."""
    text = (SCRIPTS / name).read_text()
    command = text.split("internvl/train/internvl_chat_finetune.py", 1)[1].split("2>&1", 1)[0]
    return shlex.split(command.replace("\\\n", " "))


def changed_only(flags: list[str], changes: dict[str, str | None]) -> list[str]:
    """The flags with the given values replaced (None: flag left out); every changed flag must be in
    the script, so that a change of the script shows up here."""
    pairs = list(zip(flags[::2], flags[1::2]))
    assert all(flag.startswith("--") for flag, _ in pairs) and len(flags) % 2 == 0, flags
    missing = [flag for flag in changes if flag not in dict(pairs) and flag not in SIZES]
    assert not missing, f"the script no longer has {missing}"
    out = []
    for flag, value in pairs:
        value = changes.get(flag, value)
        if value is not None:
            out += [flag, value]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("script, checkpoint_fixture", CASES)
def test_upstream_launch_script_runs_unchanged(request, script, checkpoint_fixture, small_meta, tmp_path, capsys):
    checkpoint = request.getfixturevalue(checkpoint_fixture)
    script, *added = script.split()
    flags = script_flags(script)
    paths = {"--model_name_or_path": str(checkpoint), "--meta_path": str(small_meta), "--output_dir": str(tmp_path / "out")}
    arguments = changed_only(flags, {**paths, **SIZES, **CPU}) + added
    assert main(["pretrain", *arguments]) == 0, capsys.readouterr().err[-3000:]
    output = tmp_path / "out"
    saved = sorted(output.glob("checkpoint-*"))
    assert saved, "no checkpoint written"
    for directory in (output, *saved):
        InternVLForConditionalGeneration.from_pretrained(directory)
    state = json.loads((output / "trainer_state.json").read_text())
    assert state["global_step"] >= 2
    values = dict(zip(flags[::2], flags[1::2]))
    trained, _ = load_vlm(output)
    base, _ = load_vlm(checkpoint, image_size=int(SIZES["--force_image_size"]))
    if values.get("--freeze_backbone") == "True":  # the ViT stays as it was
        vit = {k: v for k, v in base.state_dict().items() if k.startswith("vision_model.")}
        assert vit and all(torch.equal(v, trained.state_dict()[k]) for k, v in vit.items())
    if "--use_llm_lora" in values:
        assert (output / "llm_lora" / "adapter_config.json").is_file()
    if "--TMAug_prob" in values:
        logged = [e for e in state["log_history"] if "loss" in e]
        assert all("tmaug_sample_fraction" in e for e in logged)
    if "--num_train_epochs" in values:  # one epoch of 6 samples in batches of 2
        assert state["global_step"] == 3
