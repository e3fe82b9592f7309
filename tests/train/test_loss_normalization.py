"""How the loss of an optimizer step is normalised (``loss_normalization``), against upstream's rule
restated here from its sources, not from vitp's code:

* ViTP ``internvl/model/internvl_chat/modeling_internvl_chat.py`` (``InternVLChatModel.forward``): a
  padded micro-batch's loss is ``CrossEntropyLoss()`` over its shifted labels, i.e. the mean over its
  supervised tokens; a packed one's is ``sum(w * ce) / sum(w)`` with ``w = len2weight(n)`` of each
  token's sample (``internvl/train/internvl_chat_finetune.py``), ``sum(w)`` averaged over the ranks
  with ``loss_reduction_all_gather``;
* transformers 4.37.2 ``Trainer.training_step`` -> accelerate ``backward``: ``loss /
  gradient_accumulation_steps``; DDP averages the gradients over the ranks; the logged loss is the
  mean over ranks of the sum of those divided losses.

So a step's loss is mean over ranks of sum over micro-batches of L / G, and its gradient likewise.
``step`` (transformers 5's rule) divides the step's summed cross-entropy by its supervised tokens.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vitp.data.tokenizer import load_tokenizer
from vitp.model.checkpoint import build_vlm
from vitp.model.vlm import use_packed_attention

from train_testing import recorded_run

TOLERANCE = 1e-6  # fp32
ACCUMULATION = 4
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values", "num_tiles", "position_ids", "segment_ids",
                "image_flags")


@pytest.fixture(scope="module")
def mixed_meta(workspace, tmp_path_factory):
    """24 one-question samples whose answers run from 2 to about 60 tokens, so that a micro-batch's
    mean and the step's token mean differ."""
    images = sorted((workspace / "images").rglob("*.png"))
    lines = []
    for index, path in enumerate(images):
        label = path.parent.name
        answer = label.capitalize() + "." if index % 3 == 0 else f"This image shows {label}. " * (1 + index % 7)
        lines.append({"image": str(path.relative_to(workspace / "images")), "conversations": [
            {"from": "human", "value": "<image>\nWhat is in this image?"}, {"from": "gpt", "value": answer.strip()}]})
    data = tmp_path_factory.mktemp("mixed")
    (data / "mixed.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    meta = {"mixed": {"root": str(workspace / "images"), "annotation": str(data / "mixed.jsonl"), "repeat_time": 1}}
    (data / "meta.json").write_text(json.dumps(meta))
    return data / "meta.json"


# --------------------------------------------------------------------------------------------------
# The rules, restated


def logits_of(model, batch) -> torch.Tensor:
    return model(**{k: batch[k] for k in MODEL_INPUTS if k in batch}, return_logits=True).logits.float()


def shifted(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels, shifted so that position i predicts label i + 1, and flattened (upstream's)."""
    logits = logits_of(model, batch)
    return logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1)


def len2weight(labels: torch.Tensor, segment_ids: torch.Tensor, reduction: str) -> torch.Tensor:
    """Upstream's per-token loss weights of a packed batch: len2weight(n) for each sample's n supervised
    tokens, 0 where the label is ignored."""
    weights = torch.zeros(labels.shape)
    for row in range(labels.shape[0]):
        for sample in segment_ids[row].unique().tolist():
            supervised = (segment_ids[row] == sample) & (labels[row] != -100)
            n = int(supervised.sum())
            if sample >= 0 and n:
                weights[row][supervised] = {"token": 1.0, "sample": 1.0 / n, "square": 1.0 / n ** 0.5}[reduction]
    return weights


def upstream_denominators(records: list[dict], reduction: str, all_gather: bool) -> list[list[float | None]]:
    """[rank][micro-batch] the sum(w) upstream divides a packed micro-batch by: the mean over the ranks'
    same micro-batch with loss_reduction_all_gather; None: its own (and for padded batches)."""
    if not all_gather:
        return [[None] * len(record["micro_batches"]) for record in records]
    sums = [[float(len2weight(b["labels"], b["segment_ids"], reduction)[:, 1:].sum()) for b in record["micro_batches"]]
            for record in records]
    means = [sum(column) / len(column) for column in zip(*sums)]
    return [means for _ in records]


def upstream_micro_batch_loss(model, batch, reduction: str = "token", denominator: float | None = None) -> torch.Tensor:
    logits, labels = shifted(model, batch)
    if "segment_ids" not in batch:  # padded: CrossEntropyLoss()'s default, the mean over labels != -100
        return F.cross_entropy(logits, labels)
    ce = F.cross_entropy(logits, labels, reduction="none")  # 0 where the label is ignored
    weights = len2weight(batch["labels"], batch["segment_ids"], reduction)[:, 1:].reshape(-1)
    return (ce * weights).sum() / (weights.sum() if denominator is None else denominator)


def replay(model, records: list[dict], step: int, rule: str, reduction: str = "token", all_gather: bool = False):
    """The loss of optimizer step ``step`` under ``rule`` at the recorded weights, and its gradients."""
    model.load_state_dict(records[0]["steps"][step]["state"])
    model.zero_grad()
    micro = slice(step * ACCUMULATION, (step + 1) * ACCUMULATION)
    if rule == "upstream":
        denominators = upstream_denominators(records, reduction, all_gather)
        parts = [upstream_micro_batch_loss(model, batch, reduction, denominator)
                 for record, column in zip(records, denominators)
                 for batch, denominator in zip(record["micro_batches"][micro], column[micro])]
        divisor = ACCUMULATION * len(records)  # accelerate's backward, then DDP's average
    else:  # the step's summed cross-entropy over its supervised tokens, on every rank
        pairs = [shifted(model, batch) for record in records for batch in record["micro_batches"][micro]]
        parts = [F.cross_entropy(logits, labels, reduction="sum") for logits, labels in pairs]
        divisor = int(sum((labels != -100).sum() for _, labels in pairs))
    (sum(parts) / divisor).backward()
    value = sum(float(part.detach()) for part in parts) / divisor  # summed in float64: fp32 would round the sum by 1e-6
    return value, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def model_for(workspace, records: list[dict]):
    """The run's model (internvl-tiny at 56 px), at the state of its first step."""
    model = build_vlm("internvl-tiny", load_tokenizer(workspace / "tok"), image_size=56).train()
    if "segment_ids" in records[0]["micro_batches"][0]:
        use_packed_attention(model)
    model.load_state_dict(records[0]["steps"][0]["state"])
    return model


def trained_step_loss(records: list[dict], step: int) -> float:
    """The loss the Trainer logs for a step (before rounding): the mean over ranks of the summed
    losses training_step returned."""
    micro = slice(step * ACCUMULATION, (step + 1) * ACCUMULATION)
    return sum(sum(record["micro_losses"][micro]) for record in records) / len(records)


def assert_same_as(model, records, rule, **options) -> list[float]:
    losses = []
    for step in range(len(records[0]["steps"])):
        expected, gradients = replay(model, records, step, rule, **options)
        loss_error = abs(trained_step_loss(records, step) - expected)
        assert loss_error <= TOLERANCE, (step, trained_step_loss(records, step), expected)
        for record in records:  # every rank holds the averaged gradients
            trained = record["steps"][step]["grads"]
            assert trained.keys() == gradients.keys()
            worst = max(float((trained[name] - gradients[name]).abs().max()) for name in gradients)
            assert worst <= TOLERANCE, (step, worst)
        print(f"  step {step + 1}: loss {loss_error:.1e} and gradients {worst:.1e} from the {rule} rule")
        losses.append(expected)
    return losses


# --------------------------------------------------------------------------------------------------
# One process


RUN = dict(max_steps=3, gradient_accumulation_steps=ACCUMULATION, per_device_train_batch_size=2, max_grad_norm=0.0,
           save_steps=100, learning_rate=1e-2)


@pytest.mark.parametrize("normalization, rule, other", [("micro_batch", "upstream", "step"),
                                                         ("step", "step", "upstream")])
def test_each_normalization_gives_its_rules_loss_and_gradients(workspace, mixed_meta, tmp_path, normalization, rule,
                                                               other):
    """3 steps of 4 micro-batches of 2 samples (1 or 3 tiles, answers of 2 to 60 tokens): the loss and
    every gradient are the rule's, within 1e-6; and the two rules differ on these batches."""
    record = recorded_run(workspace, tmp_path / "run", meta_path=str(mixed_meta), loss_normalization=normalization,
                          **RUN)
    assert len(record["steps"]) == 3 and len(record["micro_batches"]) == 3 * ACCUMULATION
    lengths = {int((b["labels"][:, 1:] != -100).sum()) for b in record["micro_batches"]}
    assert len(lengths) > 3, lengths  # micro-batches of different sizes
    model = model_for(workspace, [record])
    losses = assert_same_as(model, [record], rule)
    print(f"{normalization}: step losses {losses}")
    for step in range(3):  # the other rule's gradients are far from the trained ones: the check can fail
        loss, gradients = replay(model, [record], step, other)
        trained = record["steps"][step]["grads"]
        difference = sum(float((trained[k] - gradients[k]).norm() ** 2) for k in trained) ** 0.5
        size = sum(float(trained[k].norm() ** 2) for k in trained) ** 0.5
        print(f"  step {step + 1}: {rule} rule {losses[step]:.6f}, {other} rule {loss:.6f}, "
              f"gradients {difference / size:.1%} apart")
        assert difference > 0.02 * size


def test_loss_reduction_leaves_padded_batches_at_the_token_mean(workspace, mixed_meta, tmp_path, caplog):
    """As upstream, whose padded collator ignores loss_reduction; loss_reduction_padded weighs them."""
    common = dict(meta_path=str(mixed_meta), max_steps=1, save_steps=100, loss_reduction="sample")
    with caplog.at_level("WARNING", logger="vitp"):
        record = recorded_run(workspace, tmp_path / "plain", **common)
    assert "loss_reduction sample has no effect on padded batches" in caplog.text
    for batch in record["micro_batches"]:
        assert torch.equal(batch["loss_weight"], (batch["labels"] != -100).float())
    weighed = recorded_run(workspace, tmp_path / "weighed", loss_reduction_padded=True, **common)
    for batch in weighed["micro_batches"]:
        supervised = batch["labels"] != -100
        expected = supervised.float() / supervised.sum(dim=1, keepdim=True)  # each sample sums to 1
        assert torch.allclose(batch["loss_weight"], expected)


# --------------------------------------------------------------------------------------------------
# Two ranks


def torchrun_records(tmp_path: Path, meta: Path, workspace: Path, *flags: str) -> list[dict]:
    """`torchrun --nproc_per_node 2` (gloo) of a 3-step run with accumulation 4, each rank recording."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "VITP_RECORD_DIR": str(tmp_path)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
        str(Path(__file__).parent / "record_pretrain.py"), "--meta_path", str(meta),
        "--output_dir", str(tmp_path / "out"),
        "--model_preset", "internvl-tiny", "--tokenizer", str(workspace / "tok"), "--force_image_size", "56",
        "--max_dynamic_patch", "2", "--dynamic_image_size", "True", "--use_thumbnail", "True",
        "--max_steps", "3", "--gradient_accumulation_steps", str(ACCUMULATION), "--per_device_train_batch_size", "1",
        "--max_grad_norm", "0", "--learning_rate", "1e-2", "--save_steps", "100", "--report_to", "none",
        "--dataloader_num_workers", "0", "--grad_checkpoint", "False", "--loss_normalization", "micro_batch", *flags,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("flags, reduction, all_gather", [
    ((), "token", False),
    (("--use_packed_ds", "True", "--strict_mode", "False", "--max_seq_length", "512", "--max_packed_tokens", "512",
      "--loss_reduction", "square", "--loss_reduction_all_gather", "True"), "square", True),
], ids=["padded", "packed-square-all-gather"])
def test_micro_batch_is_upstreams_rule_across_two_ranks(workspace, mixed_meta, tmp_path, flags, reduction, all_gather):
    """Batch 1 per rank (ViTP's recipe), or packs of samples weighed 1/n with their weight sums averaged
    over the ranks: loss and gradients are upstream's, within 1e-6."""
    records = torchrun_records(tmp_path, mixed_meta, workspace, *flags)
    assert all(len(record["steps"]) == 3 and len(record["micro_batches"]) == 3 * ACCUMULATION for record in records)
    assert all(torch.equal(records[0]["steps"][0]["state"][k], v) for k, v in records[1]["steps"][0]["state"].items())
    first, second = ([b["pixel_values"] for b in record["micro_batches"]] for record in records)
    assert not any(a.shape == b.shape and torch.equal(a, b) for a in first for b in second)  # each rank its own images
    model = model_for(workspace, records)
    losses = assert_same_as(model, records, "upstream", reduction=reduction, all_gather=all_gather)
    print(f"two ranks, {reduction}{' all-gather' if all_gather else ''}: step losses {losses}")
