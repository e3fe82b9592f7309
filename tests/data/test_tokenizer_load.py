"""load_tokenizer on checkpoint directories: InternLM2's remote-code tokenizer rebuilt with the same ids,
and no remote-code directory ever reaching transformers' interactive "run the custom code?" prompt."""

import builtins
import json
import random

import pytest

from vitp.data.tokenizer import load_tokenizer
from vitp.errors import DataError
from vitp_testing import INTERNLM2_CHAT_TOKENS, INTERNVL_TOKENS, internlm2_token_ids, write_internlm2_tokenizer


@pytest.fixture
def no_prompt(monkeypatch):
    """Fails the test if anything asks on the terminal (it would hang a batch job)."""
    asked = []

    def prompt(message=""):
        asked.append(message)
        raise EOFError

    monkeypatch.setattr(builtins, "input", prompt)
    yield
    assert not asked, f"prompted: {asked[0][-80:]}"


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_internlm2_tokenizer_gives_the_remote_codes_ids(tmp_path, no_prompt, dummy_prefix):
    write_internlm2_tokenizer(tmp_path, add_dummy_prefix=dummy_prefix)
    tokenizer = load_tokenizer(tmp_path)
    alphabet = list("abcdefgh  \n\t.,?遥感你好ü€0123") + list(INTERNLM2_CHAT_TOKENS) + list(INTERNVL_TOKENS)
    rng = random.Random(0)
    texts = ["", " leading", "two  spaces", "<|im_start|>user\n<img><IMG_CONTEXT></img>\nWhat?<|im_end|>\n"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for text in texts:
        assert tokenizer(text)["input_ids"] == internlm2_token_ids(tmp_path, text), repr(text)
    assert tokenizer("a", add_special_tokens=False)["input_ids"] == internlm2_token_ids(tmp_path, "a", add_bos=False)
    assert tokenizer.decode(tokenizer("two  spaces 遥感", add_special_tokens=False)["input_ids"]) == "two  spaces 遥感"
    assert tokenizer.pad_token == "</s>" and tokenizer.bos_token_id == 1


def test_tokens_at_ids_that_do_not_follow_the_model_are_refused(tmp_path):
    write_internlm2_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["9999"] = {"content": "<far>", "special": True}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match="'<far>' has id 9999"):
        load_tokenizer(tmp_path)


def test_an_unknown_remote_code_tokenizer_is_refused_without_a_prompt(tmp_path, bpe_tokenizer, no_prompt):
    bpe_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="SomeCustomTokenizer",
                  auto_map={"AutoTokenizer": ["tokenization_custom.SomeCustomTokenizer", None]})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DataError, match=r"remote code \(SomeCustomTokenizer\), which vitp does not run"):
        load_tokenizer(tmp_path)


def test_an_internvl_remote_code_directory_with_a_native_tokenizer_loads_without_a_prompt(tmp_path, bpe_tokenizer, no_prompt):
    """config.json names remote code (auto_map) and tokenizer_config.json names no class: transformers
    would read config.json through AutoConfig and ask whether to run InternVL's code."""
    bpe_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig"},
    }))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer("What is in this image?")["input_ids"] == bpe_tokenizer("What is in this image?")["input_ids"]
