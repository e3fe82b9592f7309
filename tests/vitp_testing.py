"""Helpers shared by the tests (a module with a unique name, importable from every test folder)."""

import torch
from PIL import Image, ImageDraw


def randomize_(model: torch.nn.Module, std: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values (init leaves LayerScale, biases and norms constant,
    which would let a wrongly mapped tensor go unnoticed)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return model


def layer_differences(ours, hf_model, pixels):
    """Max |difference| of every hidden state (embeddings, then each layer) between vitp's InternViT and
    transformers' InternVLVisionModel on ``pixels``."""
    with torch.no_grad():
        mine = ours.hidden_states(pixels)
        theirs = hf_model(pixels, output_hidden_states=True).hidden_states
    assert len(mine) == len(theirs) == ours.config.num_layers + 1
    return [(a - b).abs().max().item() for a, b in zip(mine, theirs)]


def hf_to_remote_code(hf_state, depth, prefix="vision_model."):
    """InternVL remote-code names for a transformers InternVLVisionModel state dict, written out
    independently of vitp's key table (remote code fuses q, k, v into one qkv tensor). Covers
    InternViT-300M and -6B (RMSNorms without biases, QK-norm, no qkv bias): absent tensors stay absent."""
    out = {
        prefix + "embeddings.class_embedding": hf_state["embeddings.cls_token"],
        prefix + "embeddings.position_embedding": hf_state["embeddings.position_embeddings"],
        prefix + "embeddings.patch_embedding.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
        prefix + "embeddings.patch_embedding.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
    }
    for i in range(depth):
        src, dst = f"encoder.layer.{i}.", f"{prefix}encoder.layers.{i}."
        for kind in ("weight", "bias"):
            if src + f"attention.q_proj.{kind}" in hf_state:
                out[dst + f"attn.qkv.{kind}"] = torch.cat(
                    [hf_state[src + f"attention.{p}_proj.{kind}"] for p in "qkv"]
                )
            renames = {
                "attention.projection_layer": "attn.proj", "layernorm_before": "norm1",
                "layernorm_after": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
                "attention.q_norm": "attn.q_norm", "attention.k_norm": "attn.k_norm",
            }
            for theirs, ours in renames.items():
                if src + f"{theirs}.{kind}" in hf_state:
                    out[dst + f"{ours}.{kind}"] = hf_state[src + f"{theirs}.{kind}"]
        out[dst + "ls1"] = hf_state[src + "lambda_1"]
        out[dst + "ls2"] = hf_state[src + "lambda_2"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def draw_shape(kind: str, colour: tuple[int, int, int], rng, size=(48, 40), extent: int = 24) -> Image.Image:
    """A coloured shape (ellipse, rectangle, cross) or stripes on a random dark background: images whose
    class is visible, for retrieval tests. ``extent`` is the shape's size in pixels."""
    background = tuple(int(v) for v in rng.integers(0, 70, 3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    x, y = (int(v) for v in rng.integers(0, (2 * extent) // 3, 2))
    if kind == "ellipse":
        draw.ellipse([x, y, x + extent, y + extent - 2], fill=colour)
    elif kind == "rectangle":
        draw.rectangle([x, y, x + extent - 2, y + extent - 4], fill=colour)
    elif kind == "cross":
        third = extent * 11 // 30
        draw.rectangle([x + third, y, x + extent - third, y + extent], fill=colour)
        draw.rectangle([x, y + third, x + extent, y + extent - third], fill=colour)
    else:
        period = extent // 3
        for stripe in range(0, size[0], period):
            draw.rectangle([stripe + x % (period // 2), 0, stripe + x % (period // 2) + period // 2 - 1, size[1]], fill=colour)
    return image


# ------------------------------------------------------------------------------------------------
# InternLM2: a tiny InternVL2.5-2B-style remote-code checkpoint, written by hand (InternLM2's own key
# layout, config and tokenizer files), and the published InternLM2 arithmetic as the oracle.

INTERNLM2_CHAT_TOKENS = ("<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>")
INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
TOKENIZER_TEXTS = (
    "What is in this image? A harbour with many boats.",
    "Is there water in the image? Yes, most of it is water.",
    "Describe the scene. Farmland, forest, marsh, beach and open sea.",
    "Which option matches the image? A. forest B. farmland C. sea",
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室开发的多模态大语言模型。",
    "user\nassistant\nsystem\n<image>\n",
)


def write_internlm2_tokenizer(directory, texts=TOKENIZER_TEXTS, vocab_size=400, add_dummy_prefix=True,
                              internvl_tokens=True):
    """InternLM2's tokenizer files: a sentencepiece BPE ``tokenizer.model`` (byte fallback, identity
    normalisation, unused pieces that tokenizer_config.json renames to the chat tokens, as InternLM2's)
    and a ``tokenizer_config.json`` naming the remote-code class. Returns the vocabulary size (the pieces,
    then InternVL's tokens if ``internvl_tokens``)."""
    import io
    import json
    from pathlib import Path

    import sentencepiece

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    placeholders = [f"[UNUSED_TOKEN_{141 + k}]" for k in range(len(INTERNLM2_CHAT_TOKENS))]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts) * 20), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix, user_defined_symbols=placeholders, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    added = {"<unk>": 0, "<s>": 1, "</s>": 2}
    added.update({token: processor.piece_to_id(p) for token, p in zip(INTERNLM2_CHAT_TOKENS, placeholders)})
    if internvl_tokens:
        added.update({token: processor.get_piece_size() + k for k, token in enumerate(INTERNVL_TOKENS)})
    config = {
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True}
            for t, i in added.items()
        },
        "additional_special_tokens": list(INTERNLM2_CHAT_TOKENS),
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False, "decode_with_prefix_space": False, "sp_model_kwargs": None,
        "model_max_length": 1000000000000000019884624838656,
        "chat_template": "{{ bos_token }}{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
                         "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return max(processor.get_piece_size(), max(added.values()) + 1)


def internlm2_token_ids(directory, text, add_bos=True):
    """What InternLM2's remote-code tokenizer gives for ``text``: the text split at its added tokens,
    each piece encoded by sentencepiece, BOS first (its ``add_bos_token`` default)."""
    import json
    import re
    from pathlib import Path

    import sentencepiece

    directory = Path(directory)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    decoder = json.loads((directory / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    added = {v["content"]: int(i) for i, v in decoder.items()}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids = [processor.bos_id()] if add_bos else []
    for part in re.split(pattern, text):
        if part in added:
            ids.append(added[part])
        elif part:
            ids += processor.encode(part)
    return ids


def tiny_internlm2_config(vocab_size, **overrides):
    """An InternLM2 ``config.json`` (remote code) at test size: GQA, dynamic NTK rotary as InternLM2.5."""
    return {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "bias": False, "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0},
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "attn_implementation": "flash_attention_2", "torch_dtype": "bfloat16", **overrides,
    }


def random_internlm2_weights(config, seed=0, std=0.2):
    """Random tensors under InternLM2's own names (``wqkv`` rows: per key/value head, its query heads,
    then its key head, then its value head)."""
    generator = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads
    shapes = {"model.tok_embeddings.weight": (vocab, hidden), "model.norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes[layer + "attention.wqkv.weight"] = ((heads + 2 * kv) * head_dim, hidden)
        shapes[layer + "attention.wo.weight"] = (hidden, heads * head_dim)
        if config.get("bias", True):
            shapes[layer + "attention.wqkv.bias"] = ((heads + 2 * kv) * head_dim,)
            shapes[layer + "attention.wo.bias"] = (hidden,)
        shapes[layer + "feed_forward.w1.weight"] = (inter, hidden)
        shapes[layer + "feed_forward.w3.weight"] = (inter, hidden)
        shapes[layer + "feed_forward.w2.weight"] = (hidden, inter)
        shapes[layer + "attention_norm.weight"] = (hidden,)
        shapes[layer + "ffn_norm.weight"] = (hidden,)
    weights = {name: torch.randn(shape, generator=generator) * std for name, shape in shapes.items()}
    for name in weights:  # norms near 1, as trained ones
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + weights[name]
    return weights


def internlm2_logits(weights, config, input_ids):
    """InternLM2's forward pass (``modeling_internlm2.py``'s arithmetic, eager attention, no padding),
    rebuilt from its formulas: RMSNorm, rotary embedding with InternLM2's linear / dynamic-NTK scaling,
    grouped-query attention over the per-group ``wqkv`` layout, SwiGLU feed-forward."""
    import math

    import torch.nn.functional as F

    hidden, heads, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, per_group = hidden // heads, heads // kv
    eps, base = config["rms_norm_eps"], float(config["rope_theta"])
    batch, length = input_ids.shape

    def rms_norm(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    positions = torch.arange(length, dtype=torch.float32)
    scaling = config.get("rope_scaling") or {}
    if scaling.get("type") == "linear":
        positions = positions / scaling["factor"]
    if scaling.get("type") == "dynamic" and length > config["max_position_embeddings"]:
        factor = scaling["factor"]
        base = base * (factor * length / config["max_position_embeddings"] - (factor - 1)) ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.cat([torch.outer(positions, inv_freq)] * 2, dim=-1)
    cos, sin = angles.cos(), angles.sin()

    def rotate(x):  # x: (batch, heads, length, head_dim)
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    causal = torch.full((length, length), float("-inf")).triu(1)
    x = weights["model.tok_embeddings.weight"][input_ids]
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        h = rms_norm(x, weights[layer + "attention_norm.weight"])
        qkv = F.linear(h, weights[layer + "attention.wqkv.weight"], weights.get(layer + "attention.wqkv.bias"))
        qkv = qkv.reshape(batch, length, kv, per_group + 2, head_dim)
        q = qkv[:, :, :, :per_group].reshape(batch, length, heads, head_dim).transpose(1, 2)
        k = qkv[:, :, :, per_group].transpose(1, 2)
        v = qkv[:, :, :, per_group + 1].transpose(1, 2)
        q, k = rotate(q), rotate(k)
        k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim) + causal
        attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, hidden)
        x = x + F.linear(attended, weights[layer + "attention.wo.weight"], weights.get(layer + "attention.wo.bias"))
        h = rms_norm(x, weights[layer + "ffn_norm.weight"])
        gate = F.silu(F.linear(h, weights[layer + "feed_forward.w1.weight"]))
        x = x + F.linear(gate * F.linear(h, weights[layer + "feed_forward.w3.weight"]), weights[layer + "feed_forward.w2.weight"])
    return F.linear(rms_norm(x, weights["model.norm.weight"]), weights["output.weight"])


def write_internlm2_causal_lm(directory, seed=0, **config_overrides):
    """A causal-LM directory as InternLM2 checkpoints ship it (remote-code config, its own key names,
    InternLM2's tokenizer without InternVL's tokens). Returns (config, weights)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    directory = Path(directory)
    config = tiny_internlm2_config(vocab_size=write_internlm2_tokenizer(directory, internvl_tokens=False), **config_overrides)
    weights = random_internlm2_weights(config, seed=seed)
    save_file(weights, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return config, weights


def write_qwen2_causal_lm(directory, tokenizer, seed=None):
    """A tiny Qwen2 causal-LM directory (hidden 48, 2 layers, tied embeddings) with ``tokenizer`` beside it,
    as Qwen2.5 checkpoints ship. ``seed``: randomize every parameter (else transformers' init). Returns the LM."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), tie_word_embeddings=True)
    llm = Qwen2ForCausalLM(config)
    if seed is not None:
        randomize_(llm, seed=seed)
    llm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return llm.eval()


# transformers InternVLVisionConfig values of tiny InternViTs: 300M's architecture, and 6B's (RMSNorm,
# whole-width QK-norm, no qkv bias; the real 6B has hidden 3200, 25 heads of 128, MLP 12800)
TINY_VISION_HF = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
    image_size=112, patch_size=14, attention_bias=True,
)
TINY_6B_HF = dict(
    hidden_size=100, num_hidden_layers=2, num_attention_heads=5, intermediate_size=400, image_size=112,
    patch_size=14, attention_bias=False, use_qk_norm=True, norm_type="rms_norm", layer_norm_eps=1e-6,
)


def internvit_remote_config(hf_config):
    """The ``vision_config`` of an InternVL remote-code checkpoint for a transformers InternVLVisionConfig."""
    return {
        "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
        "hidden_size": hf_config.hidden_size, "num_hidden_layers": hf_config.num_hidden_layers,
        "num_attention_heads": hf_config.num_attention_heads, "intermediate_size": hf_config.intermediate_size,
        "image_size": hf_config.image_size[0], "patch_size": hf_config.patch_size[0],
        "qkv_bias": hf_config.attention_bias, "qk_normalization": hf_config.use_qk_norm,
        "norm_type": hf_config.norm_type, "layer_norm_eps": hf_config.layer_norm_eps,
        "initializer_factor": 0.1, "drop_path_rate": 0.0, "hidden_act": "gelu", "use_flash_attn": True,
    }


def write_internvl_remote_checkpoint(directory, llm_config, llm_weights, seed=0, vision=TINY_VISION_HF,
                                     template="internvl2_5"):
    """An InternVL remote-code checkpoint directory (``InternVLChatModel``) around given LLM tensors (named
    as the LLM's own remote code names them): a random InternViT under ``vision_model.``, a random
    ``mlp1``, the LLM under ``language_model.``. Returns (the transformers InternVLVisionModel whose
    weights it holds, the mlp1 tensors)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    from transformers import InternVLVisionConfig, InternVLVisionModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vision_model = randomize_(InternVLVisionModel(InternVLVisionConfig(**vision)), seed=seed + 1).eval()
    tensors = hf_to_remote_code(vision_model.state_dict(), depth=vision_model.config.num_hidden_layers)
    generator = torch.Generator().manual_seed(seed + 2)
    width, llm_hidden = 4 * vision_model.config.hidden_size, llm_config["hidden_size"]
    mlp1 = {
        "mlp1.0.weight": 1.0 + 0.1 * torch.randn(width, generator=generator), "mlp1.0.bias": 0.1 * torch.randn(width, generator=generator),
        "mlp1.1.weight": 0.1 * torch.randn(llm_hidden, width, generator=generator), "mlp1.1.bias": 0.1 * torch.randn(llm_hidden, generator=generator),
        "mlp1.3.weight": 0.2 * torch.randn(llm_hidden, llm_hidden, generator=generator), "mlp1.3.bias": 0.1 * torch.randn(llm_hidden, generator=generator),
    }
    tensors.update(mlp1)
    tensors.update({"language_model." + name: tensor.clone() for name, tensor in llm_weights.items()})
    save_file(tensors, directory / "model.safetensors")
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                     "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                     "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"},
        "template": template, "select_layer": -1, "downsample_ratio": 0.5, "ps_version": "v2",
        "force_image_size": vision["image_size"], "dynamic_image_size": True, "use_thumbnail": True,
        "min_dynamic_patch": 1, "max_dynamic_patch": 12,
        "vision_config": internvit_remote_config(vision_model.config), "llm_config": llm_config,
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return vision_model, mlp1


def write_internlm2_internvl_checkpoint(directory, seed=0, template="internvl2_5", **llm_overrides):
    """A tiny InternVL2.5-2B: InternVL remote-code checkpoint with an InternLM2 LLM (InternLM2's key
    layout and config) and InternLM2's remote-code tokenizer files with InternVL's tokens. Returns
    a dict: ``llm_config``, ``llm_weights`` (InternLM2 names, for :func:`internlm2_logits`),
    ``vision_model`` (transformers InternVLVisionModel with the ViT's weights), ``mlp1``."""
    llm_config = tiny_internlm2_config(vocab_size=write_internlm2_tokenizer(directory), **llm_overrides)
    llm_weights = random_internlm2_weights(llm_config, seed=seed)
    vision_model, mlp1 = write_internvl_remote_checkpoint(directory, llm_config, llm_weights, seed=seed, template=template)
    return {"llm_config": llm_config, "llm_weights": llm_weights, "vision_model": vision_model, "mlp1": mlp1}


def parser_refusal(argv, capsys) -> str:
    """stderr of a `vitp` command line its argument parser refuses (exit 2, before any handler runs)."""
    import pytest

    from vitp.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def multi_image_batch(model, pad_id):
    """A right-padded batch of two samples: one image of 3 tiles; two images of 1 tile each with text
    between them. Returns (ids, attention mask, labels on the text after the first image, pixels, tiles
    per sample)."""
    ctx, n = model.vlm_config.image_token_id, model.vlm_config.num_image_token
    rows = [
        [40, 41] + [ctx] * (3 * n) + [42, 43, 44, 45],
        [40] + [ctx] * n + [46, 47] + [ctx] * n + [48, 49, 50],
    ]
    longest = max(map(len, rows))
    ids = torch.full((2, longest), pad_id)
    mask = torch.zeros(2, longest, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
    labels = torch.where((ids >= 42) & (mask == 1), ids, torch.full_like(ids, -100))
    size = model.vlm_config.vision.image_size
    pixels = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(4))
    return ids, mask, labels, pixels, torch.tensor([3, 2])


def plain_class_means(values, classes):
    """class -> mean of ``values`` over its queries, one query at a time."""
    sums, counts = {}, {}
    for value, name in zip(values, classes):
        sums[name] = sums.get(name, 0.0) + float(value)
        counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}
