"""The InternViT encoder: presets, hidden-state indexing, DropPath, checkpointing, other input sizes."""

import pytest
import timm
import torch

from vitp import PRESETS, ConfigError, InternViT, VisionConfig, build_vit, vision_config
from vitp.model.vision import count_parameters


def test_internvit_300m_preset_is_timms_intern300m_network():
    with torch.device("meta"):
        ours = build_vit("internvit-300m")
        reference = timm.create_model("vit_intern300m_patch14_448", pretrained=False, num_classes=0)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    reference_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours_shapes == reference_shapes
    assert ours_shapes["pos_embed"] == (1, 1 + 32 * 32, 1024)
    assert round(count_parameters(ours) / 1e6) == 304  # InternViT-300M-448px


def test_explicit_sizes_build_that_network():
    custom = VisionConfig(image_size=64, patch_size=8, hidden_size=96, num_layers=4, num_heads=3, intermediate_size=200)
    model = InternViT(custom).eval()
    assert model.blocks[0].mlp.fc1.out_features == 200
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1 + 64, 96)
    assert vision_config("internvit-tiny", drop_path_rate=0.2).drop_path_rate == 0.2


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_heads=5), "not divisible by num_heads"),
        (dict(image_size=100), "not a multiple of patch_size"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(num_layers=0), "positive integer"),
    ],
)
def test_invalid_configs_are_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        PRESETS["internvit-tiny"].replace(**changes)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ConfigError, match="internvit-300m"):
        vision_config("internvit-huge")


def test_select_layer_follows_internvl_indexing(tiny_vit, pixels):
    with torch.no_grad():
        states = tiny_vit.hidden_states(pixels)
        assert len(states) == tiny_vit.config.num_layers + 1
        assert torch.equal(states[0], tiny_vit.embed(pixels))  # index 0: embedding output
        for index in range(-len(states), len(states)):
            assert torch.equal(tiny_vit(pixels, select_layer=index), states[index])
        assert torch.equal(tiny_vit(pixels), states[-1])  # default -1: last block
        assert not torch.equal(states[1], states[2])


def test_select_layer_out_of_range(tiny_vit, pixels):
    for bad in (3, -4):
        with pytest.raises(ValueError, match="valid values are -3..2"):
            tiny_vit(pixels, select_layer=bad)


def test_blocks_after_the_selected_layer_do_not_run(tiny_vit, pixels):
    calls = []
    for index, block in enumerate(tiny_vit.blocks):
        block.register_forward_hook(lambda *_, index=index: calls.append(index))
    tiny_vit(pixels, select_layer=1)
    assert calls == [0]


def test_cls_token_can_be_dropped(tiny_vit, pixels):
    with torch.no_grad():
        with_cls = tiny_vit(pixels)
        without = tiny_vit(pixels, keep_cls=False)
    assert without.shape == (2, 64, 64)
    assert torch.equal(without, with_cls[:, 1:])


def test_drop_path_schedule_is_linear_and_active_only_in_training(pixels):
    model = build_vit("internvit-tiny", num_layers=4, drop_path_rate=0.3)
    assert model.drop_path_rates() == pytest.approx([0.0, 0.1, 0.2, 0.3])
    torch.manual_seed(0)
    model.train()
    train_outputs = [model(pixels) for _ in range(3)]
    assert not all(torch.equal(train_outputs[0], out) for out in train_outputs[1:])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixels), model(pixels))


def test_without_drop_path_training_is_deterministic(tiny_vit, pixels):
    tiny_vit.train()
    assert torch.equal(tiny_vit(pixels), tiny_vit(pixels))


def test_activation_checkpointing_gives_the_same_outputs_and_gradients(pixels):
    plain = build_vit("internvit-tiny").train()
    checkpointed = build_vit("internvit-tiny").train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.set_grad_checkpointing(True)
    out_plain, out_ckpt = plain(pixels), checkpointed(pixels)
    assert torch.allclose(out_plain, out_ckpt, atol=1e-6)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


@pytest.mark.parametrize("size", [(56, 56), (224, 224), (84, 140)])
def test_other_input_sizes_interpolate_the_position_embedding(tiny_vit, size):
    pixels = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = tiny_vit(pixels)
    assert out.shape == (1, 1 + (size[0] // 14) * (size[1] // 14), 64)
    assert torch.isfinite(out).all()


def test_low_precision_weights_accept_float32_pixels(tiny_vit, pixels):
    model = tiny_vit.to(torch.bfloat16)
    with torch.no_grad():
        out = model(pixels)
    assert out.dtype == torch.bfloat16


def test_wrong_pixel_shape_is_a_clear_error(tiny_vit):
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        tiny_vit(torch.zeros(3, 112, 112))
