"""The training dataset and collator: tiles, image-token counts, drops, padding."""

import pytest
import torch

from vitp.data.dataset import Collator, InstructionDataset
from vitp.data.meta import read_meta
from vitp.data.templates import IGNORE_INDEX
from vitp.errors import DataError

from data_testing import conversation, save_image, settings, write_dataset

SETTINGS = settings(num_image_token=4, max_dynamic_patch=6, max_seq_length=2048,
                        system_message="Answer briefly.")


def dataset_of(tmp_path, lines, tokenizer, settings=SETTINGS, train=True, **meta_fields):
    meta_path = write_dataset(tmp_path, lines, **meta_fields)
    return InstructionDataset(read_meta(meta_path), tokenizer, settings, train=train)


def count_context(tokenizer, ids):
    return int((ids == tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")).sum())


def test_multi_tile_image(tmp_path, bpe_tokenizer):
    save_image(tmp_path / "images" / "wide.png", 200, 100)  # aspect 2 -> 2x1 grid + thumbnail
    data = dataset_of(tmp_path, [{"image": "wide.png", "conversations": conversation()}], bpe_tokenizer)
    item = data[0]
    assert item["pixel_values"].shape == (3, 3, 28, 28) and item["num_tiles"] == 3
    assert count_context(bpe_tokenizer, item["input_ids"]) == 3 * 4
    assert item["dropped"] == []


def test_multi_image_budget_is_shared(tmp_path, bpe_tokenizer):
    save_image(tmp_path / "images" / "a.png", 300, 100)  # alone: 3x1 + thumbnail; with budget 3: 3x1 + thumbnail
    save_image(tmp_path / "images" / "b.png", 400, 100)  # alone: 4x1 + thumbnail; with budget 3: 3x1 + thumbnail
    line = {"image": ["a.png", "b.png"], "conversations": conversation("<image>\n<image>\nSame place?", "Yes.")}
    item = dataset_of(tmp_path, [line], bpe_tokenizer)[0]  # max_dynamic_patch 6 // 2 images = 3
    assert item["num_tiles"] == 8
    assert count_context(bpe_tokenizer, item["input_ids"]) == 8 * 4


def test_per_dataset_max_dynamic_patch_overrides_the_global_one(tmp_path, bpe_tokenizer):
    save_image(tmp_path / "images" / "wide.png", 600, 100)
    data = dataset_of(tmp_path, [{"image": "wide.png", "conversations": conversation()}], bpe_tokenizer, max_dynamic_patch=2)
    assert data[0]["num_tiles"] == 3  # 2x1 + thumbnail instead of 6x1 + thumbnail


def test_single_image_without_placeholder_gets_one(tmp_path, bpe_tokenizer):
    save_image(tmp_path / "images" / "sq.png", 20, 20)  # small: one tile, no thumbnail
    item = dataset_of(tmp_path, [{"image": "sq.png", "conversations": conversation("What is it?", "Sea.")}], bpe_tokenizer)[0]
    assert count_context(bpe_tokenizer, item["input_ids"]) == 4
    assert "<img>" in bpe_tokenizer.decode(item["input_ids"])


def test_bad_lines_are_skipped_and_reported_not_raised(tmp_path, bpe_tokenizer):
    save_image(tmp_path / "images" / "ok.png", 50, 50)
    lines = [
        "{broken json",
        {"image": "missing.png", "conversations": conversation()},
        {"image": "ok.png", "conversations": conversation()},
    ]
    data = dataset_of(tmp_path, lines, bpe_tokenizer)
    item = data[0]
    assert item["where"].endswith("ds.jsonl:3")
    assert item["dropped"][0][1] == "invalid JSON" and item["dropped"][0][0].endswith("ds.jsonl:1")
    kinds = {"1": "invalid JSON", "2": "missing image"}
    assert all(kinds[where.rsplit(":", 1)[1]] == kind for where, kind, _ in item["dropped"])


def test_a_run_of_bad_lines_is_replaced_fairly_and_repeatably(tmp_path, bpe_tokenizer):
    """70 bad lines in a row (a missing image folder) must not stop training, and their stand-ins are
    drawn at random: the good line after the run is not trained on 70 times more often."""
    bad = [{"image": f"gone/{i}.png", "conversations": conversation()} for i in range(70)]
    good = [{"conversations": conversation(f"question {i}", "answer")} for i in range(30)]
    data = dataset_of(tmp_path, good[:10] + bad + good[10:], bpe_tokenizer)
    lines = [data[i]["where"].rsplit(":", 1)[1] for i in range(len(data))]
    assert all(int(line) <= 10 or int(line) > 80 for line in lines)  # only good lines come out
    assert max(lines.count(line) for line in set(lines)) <= 12  # mean 100/30; the next line would be 71
    again = dataset_of(tmp_path / "again", good[:10] + bad + good[10:], bpe_tokenizer)
    assert [again[i]["where"].rsplit(":", 1)[1] for i in range(len(again))] == lines  # resume builds the same


def test_data_that_is_almost_all_bad_stops_with_the_reasons(tmp_path, bpe_tokenizer):
    lines = ["{broken json"] * 200 + [{"conversations": conversation()}]
    data = dataset_of(tmp_path, lines, bpe_tokenizer)
    with pytest.raises(DataError, match=r"most of the data is bad, e\.g\. .*ds\.jsonl:\d+: invalid JSON.*vitp data check"):
        data[0]


def test_sample_whose_image_would_be_cut_is_dropped(tmp_path, bpe_tokenizer):
    save_image(tmp_path / "images" / "wide.png", 600, 100)
    custom = settings(num_image_token=64, max_dynamic_patch=6, max_seq_length=200,
                            system_message="s")
    lines = [{"image": "wide.png", "conversations": conversation()}, {"conversations": conversation("hi", "ho")}]
    item = dataset_of(tmp_path, lines, bpe_tokenizer, settings=custom)[0]
    assert item["num_tiles"] == 0 and item["where"].endswith(":2")
    (where, kind, reason), = item["dropped"]
    assert kind == "too long" and "would cut image 1" in reason


def test_jpeg_augmentation_only_when_asked_and_training(tmp_path, bpe_tokenizer):
    save_image(tmp_path / "images" / "sq.png", 28, 28)
    lines = [{"image": "sq.png", "conversations": conversation()}]
    plain = dataset_of(tmp_path / "a", lines, bpe_tokenizer)
    save_image(tmp_path / "a" / "images" / "sq.png", 28, 28)
    save_image(tmp_path / "b" / "images" / "sq.png", 28, 28)
    augmented = dataset_of(tmp_path / "b", lines, bpe_tokenizer, data_augment=True)
    evaluation = InstructionDataset(augmented.specs, bpe_tokenizer, SETTINGS, train=False)
    assert torch.equal(plain[0]["pixel_values"], evaluation[0]["pixel_values"])
    assert not torch.equal(plain[0]["pixel_values"], augmented[0]["pixel_values"])


def test_jpeg_quality_is_drawn_from_upstreams_range_per_tile(tmp_path, bpe_tokenizer, monkeypatch):
    import vitp.data.dataset as dataset_module

    qualities = []
    real = dataset_module.jpeg_reencode
    monkeypatch.setattr(dataset_module, "jpeg_reencode", lambda image, q: qualities.append(q) or real(image, q))
    save_image(tmp_path / "images" / "wide.png", 200, 100)  # 3 tiles per sample
    data = dataset_of(tmp_path, [{"image": "wide.png", "conversations": conversation()}], bpe_tokenizer,
                      data_augment=True)
    for _ in range(20):
        data[0]
    assert len(qualities) == 60 and min(qualities) >= 75 and max(qualities) <= 100 and len(set(qualities)) > 5


def test_collator_pads_to_the_longest_sample_and_maps_tiles(tmp_path, bpe_tokenizer):
    save_image(tmp_path / "images" / "wide.png", 200, 100)
    lines = [
        {"image": "wide.png", "conversations": conversation()},
        {"conversations": conversation("hi", "A much longer answer than the other one, with many more words in it.")},
    ]
    data = dataset_of(tmp_path, lines, bpe_tokenizer)
    samples = [data[0], data[1]]
    batch = Collator(bpe_tokenizer.pad_token_id)(samples)
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (2, max(lengths)) and max(lengths) < SETTINGS.max_seq_length
    short = lengths.index(min(lengths))
    assert (batch["input_ids"][short, min(lengths):] == bpe_tokenizer.pad_token_id).all()
    assert (batch["labels"][short, min(lengths):] == IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert batch["pixel_values"].shape == (3, 3, 28, 28)
    assert batch["num_tiles"].tolist() == [3, 0]
    assert torch.equal(batch["loss_weight"] > 0, batch["labels"] != IGNORE_INDEX)  # 'token': weight 1 each
    counts = (batch["labels"] != IGNORE_INDEX).sum(1, keepdim=True)
    by_sample = Collator(bpe_tokenizer.pad_token_id, "sample")(samples)["loss_weight"]
    assert torch.allclose(by_sample.sum(1), torch.ones(2))  # 'sample': every sample weighs 1
    square = Collator(bpe_tokenizer.pad_token_id, "square")(samples)["loss_weight"]
    assert torch.allclose(square.sum(1, keepdim=True), counts.float().sqrt())


def test_works_with_a_dataloader_and_workers(tmp_path, bpe_tokenizer):
    for i in range(4):
        save_image(tmp_path / "images" / f"{i}.png", 40 + 30 * i, 40)
    lines = [{"image": f"{i}.png", "conversations": conversation()} for i in range(4)]
    data = dataset_of(tmp_path, lines, bpe_tokenizer)
    loader = torch.utils.data.DataLoader(data, batch_size=2, num_workers=2, collate_fn=Collator(bpe_tokenizer.pad_token_id))
    batches = list(loader)
    assert sum(len(b["input_ids"]) for b in batches) == 4
    assert sum(int(b["num_tiles"].sum()) for b in batches) == sum(int(data[i]["num_tiles"]) for i in range(4))


def test_shared_budget_below_min_dynamic_patch_gives_one_tile_per_image_as_upstream(tmp_path, bpe_tokenizer):
    """min 2, max 6, four images: each image's budget is max(1, 6 // 4) = 1 < 2; upstream finds no grid
    and keeps the image as one tile, where a strict check would stop training."""
    for name in "abcd":
        save_image(tmp_path / "images" / f"{name}.png", 300, 100)
    custom = settings(num_image_token=4, min_dynamic_patch=2, max_dynamic_patch=6,
                            max_seq_length=2048, system_message="s")
    line = {"image": [f"{n}.png" for n in "abcd"], "conversations": conversation("<image>" * 4 + "\nSame?", "Yes.")}
    item = dataset_of(tmp_path, [line], bpe_tokenizer, settings=custom)[0]
    assert item["dropped"] == [] and item["num_tiles"] == 4


def test_measure_predicts_the_built_sample_without_decoding_it(tmp_path, bpe_tokenizer):
    for i, size in enumerate([(200, 100), (60, 60), (90, 300)]):
        save_image(tmp_path / "images" / f"{i}.png", *size)
    lines = [{"image": "0.png", "conversations": conversation()},
             {"image": ["1.png", "2.png"], "conversations": conversation("<image><image>\nSame?", "No.")},
             {"conversations": conversation("hi", "ho")}]
    data = dataset_of(tmp_path, lines, bpe_tokenizer)
    for index in range(3):
        item = data[index]
        assert data.measure(index) == (len(item["input_ids"]), item["num_tiles"])


@pytest.mark.parametrize("normalize_type, mean", [("imagenet", (0.485, 0.456, 0.406)), ("siglip", (0.5, 0.5, 0.5))])
def test_normalisation_and_pad_to_square(tmp_path, bpe_tokenizer, normalize_type, mean):
    from PIL import Image

    (tmp_path / "images").mkdir(parents=True)
    Image.new("RGB", (56, 28), (255, 255, 255)).save(tmp_path / "images" / "white.png")
    line = {"image": "white.png", "conversations": conversation()}
    flat = settings(dynamic_image_size=False, normalize_type=normalize_type, system_message="s")
    tile = dataset_of(tmp_path, [line], bpe_tokenizer, settings=flat)[0]["pixel_values"][0]
    std = {"imagenet": (0.229, 0.224, 0.225), "siglip": (0.5, 0.5, 0.5)}[normalize_type]
    white = torch.tensor([(1 - m) / s for m, s in zip(mean, std)])
    assert torch.allclose(tile.mean(dim=(1, 2)), white, atol=1e-3)  # a whole white tile
    padded = settings(dynamic_image_size=False, normalize_type=normalize_type, pad2square=True, system_message="s")
    tile = dataset_of(tmp_path, [line], bpe_tokenizer, settings=padded)[0]["pixel_values"][0]
    # the 2:1 image centred on a square of the mean colour (which normalises to about 0)
    assert torch.allclose(tile[:, 14, :], white.unsqueeze(1).expand(3, 28), atol=0.05)
    assert tile[:, :5, :].abs().max() < 0.05 and tile[:, -5:, :].abs().max() < 0.05


def test_template_and_classifier_targets_reach_the_batch(tmp_path, bpe_tokenizer):
    save_image(tmp_path / "images" / "a.png", 40, 40)
    lines = [{"image": "a.png", "conversations": conversation("<cls>Which one? Options: sea|forest. Say it.", "sea")},
             {"conversations": conversation("hi", "ho")}]
    data = dataset_of(tmp_path, lines, bpe_tokenizer, settings=settings(use_classifier=True, system_message="s"))
    batch = Collator(bpe_tokenizer.pad_token_id)([data[0], data[1]])
    ((row, target),) = batch["classify"]
    assert row == 0 and batch["input_ids"][0, target.position] == target.answer_id
    hermes = dataset_of(tmp_path, lines, bpe_tokenizer, settings=settings(conv_style="Hermes-2", system_message="s"))
    text = bpe_tokenizer.decode(hermes[1]["input_ids"])
    assert text == "<|im_start|>system\ns<|im_end|><|im_start|>user\nhi<|im_end|><|im_start|>assistant\nho<|im_end|>"
