"""The key-table vocabulary: fused tensors split and joined exactly, and a table that cannot hold a
model's tensor says so."""

import pytest
import torch

from vitp.errors import ConfigError
from vitp.model.formats.keymap import Fuse, GroupedQKV, KeyMap, Rename
from vitp.model.formats.llm import INTERNLM2, NATIVE, PHI3, llm_family


def test_grouped_qkv_round_trip_and_layout():
    """4 query heads over 2 key/value heads, head size 3: rows of wqkv are q0 q1 k0 v0 | q2 q3 k1 v1."""
    table = KeyMap([GroupedQKV(["q.{kind}", "k.{kind}", "v.{kind}"], "wqkv.{kind}")],
                   {"num_attention_heads": 4, "num_key_value_heads": 2})
    head = lambda name, n: torch.full((3, 5), float(n)) + (100 if name == "k" else 200 if name == "v" else 0)  # noqa: E731
    ours = {"q.weight": torch.cat([head("q", n) for n in range(4)]),
            "k.weight": torch.cat([head("k", n) for n in range(2)]), "v.weight": torch.cat([head("v", n) for n in range(2)])}
    fused = table.to_theirs(ours)["wqkv.weight"]
    assert fused[:, 0].reshape(-1, 3)[:, 0].tolist() == [0, 1, 100, 200, 2, 3, 101, 201]
    (group,) = table.groups(ours)
    back = table.to_ours(group, {"wqkv.weight": fused})
    assert all(torch.equal(back[k], ours[k]) for k in ours)


def test_fuse_round_trip_and_prefixes():
    table = KeyMap([Fuse("qkv.weight", ["q.weight", "k.weight", "v.weight"]), Rename("{rest}", "{rest}")]).prefixed("a.", "b.")
    state = {"a.qkv.weight": torch.arange(12.0).reshape(6, 2), "a.other": torch.ones(1)}
    stored = table.to_theirs(state)
    assert set(stored) == {"b.q.weight", "b.k.weight", "b.v.weight", "b.other"}
    assert table.our_names("b.k.weight") == ("a.qkv.weight",)


def test_a_tensor_no_rule_names_or_half_a_group_is_refused():
    table = KeyMap([GroupedQKV(["q.w", "k.w", "v.w"], "wqkv.w")], {"num_attention_heads": 2, "num_key_value_heads": 1})
    with pytest.raises(KeyError, match="no rule"):
        table.groups(["lm_head.weight"])
    with pytest.raises(KeyError, match="stored together with"):
        table.groups(["q.w", "k.w"])


@pytest.mark.parametrize("architecture, family", [("InternLM2ForCausalLM", INTERNLM2), ("Phi3ForCausalLM", PHI3),
                                                  ("Qwen2ForCausalLM", NATIVE), ("LlamaForCausalLM", NATIVE)])
def test_the_family_follows_architectures_as_internvls_remote_code_does(architecture, family):
    config = {"architectures": [architecture], "model_type": "something-stale", "hidden_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64, "vocab_size": 10}
    found, native = llm_family(config, "llm_config")
    assert found is family and native["model_type"] in ("llama", "phi3", "qwen2")


def test_an_llm_transformers_does_not_ship_is_refused_by_name():
    with pytest.raises(ConfigError, match="model_type 'mamba-x' is not one vitp can build") as refused:
        llm_family({"model_type": "mamba-x"}, "llm_config")
    assert len(str(refused.value)) < 200  # one line a person reads, not transformers' list of every model type
    with pytest.raises(ConfigError, match="rope_scaling"):
        llm_family({"model_type": "internlm2", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "intermediate_size": 64, "vocab_size": 10, "rope_scaling": {"type": "yarn", "factor": 2.0}}, "c")
    with pytest.raises(ConfigError, match="rope_scaling .*Phi-3 defines 'su'/'longrope'"):
        llm_family({"model_type": "phi3", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                    "intermediate_size": 64, "vocab_size": 10, "rope_scaling": {"rope_type": "longrope"}}, "c")
