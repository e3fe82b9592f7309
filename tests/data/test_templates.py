"""The chat templates: a hand-computed internvl2_5 mask, image-token expansion, refusals. The four
templates against upstream's algorithms are in test_templates_upstream.py."""

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from vitp.data.meta import Turn
from vitp.data.templates import (
    IGNORE_INDEX,
    ConversationTokenizer,
    TemplateError,
    TokenizedConversation,
    prepare_tokenizer,
    truncate,
    truncation_problem,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>"]
WORDS = ["system", "user", "assistant", "\n", " ", "Be", "brief", ".", "What", "is", "it", "?", "A", "ship",
         "Where", "At", "sea", "[UNK]"]


@pytest.fixture(scope="module")
def word_tokenizer():
    """A word-level tokenizer with a vocabulary written here, so that expected ids can be listed by hand."""
    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\n| "), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[1:]})
    return tokenizer


def test_two_turn_conversation_matches_a_hand_computed_mask(word_tokenizer):
    turns = (Turn("human", "<image>\nWhat is it?"), Turn("gpt", "A ship."), Turn("human", "Where?"), Turn("gpt", "At sea."))
    result = ConversationTokenizer(word_tokenizer)(turns, "Be brief.", image_token_counts=[4])
    # (token, supervised?) written out by hand from the template
    expected = (
        [("<|im_start|>", 0), ("system", 0), ("\n", 0), ("Be", 0), (" ", 0), ("brief", 0), (".", 0),
         ("<|im_end|>", 0), ("\n", 0)]
        + [("<|im_start|>", 0), ("user", 0), ("\n", 0), ("<img>", 0)] + [("<IMG_CONTEXT>", 0)] * 4
        + [("</img>", 0), ("\n", 0), ("What", 0), (" ", 0), ("is", 0), (" ", 0), ("it", 0), ("?", 0),
           ("<|im_end|>", 0), ("\n", 0)]
        + [("<|im_start|>", 0), ("assistant", 0), ("\n", 0), ("A", 1), (" ", 1), ("ship", 1), (".", 1),
           ("<|im_end|>", 1), ("\n", 0)]
        + [("<|im_start|>", 0), ("user", 0), ("\n", 0), ("Where", 0), ("?", 0), ("<|im_end|>", 0), ("\n", 0)]
        + [("<|im_start|>", 0), ("assistant", 0), ("\n", 0), ("At", 1), (" ", 1), ("sea", 1), (".", 1),
           ("<|im_end|>", 1), ("\n", 0)]
    )
    ids = word_tokenizer.convert_tokens_to_ids([token for token, _ in expected])
    assert result.input_ids == ids
    assert result.labels == [i if supervised else IGNORE_INDEX for i, (_, supervised) in zip(ids, expected)]
    assert result.image_spans == [(12, 18)]


def test_default_system_message_and_override(bpe_tokenizer):
    tokenizer = ConversationTokenizer(bpe_tokenizer)
    turns = (Turn("human", "What is in this image?"), Turn("gpt", "Water."))
    default = bpe_tokenizer.decode(tokenizer(turns, None, []).input_ids)
    assert default.startswith("<|im_start|>system\n你是书生·万象，英文名是InternVL")
    custom = bpe_tokenizer.decode(tokenizer(turns, "Answer briefly.", []).input_ids)
    assert custom.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")


def test_each_image_expands_to_its_own_token_count(bpe_tokenizer):
    tokenizer = ConversationTokenizer(bpe_tokenizer)
    turns = (Turn("human", "<image>\n<image>\nCompare the images."), Turn("gpt", "Both show water."))
    result = tokenizer(turns, "s", image_token_counts=[3 * 16, 2 * 16])
    context = bpe_tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert result.input_ids.count(context) == 80
    (a0, a1), (b0, b1) = result.image_spans
    assert result.input_ids[a0 + 1 : a1 - 1] == [context] * 48 and result.input_ids[b0 + 1 : b1 - 1] == [context] * 32
    assert all(result.labels[i] == IGNORE_INDEX for i in range(a0, b1))


def test_expansion_in_id_space_equals_writing_every_context_token(bpe_tokenizer):
    tokenizer = ConversationTokenizer(bpe_tokenizer)
    turns = (Turn("human", "<image>\nWhat is in this image?"), Turn("gpt", "A harbour."))
    result = tokenizer(turns, "s", image_token_counts=[7])
    written = "<img>" + "<IMG_CONTEXT>" * 7 + "</img>\nWhat is in this image?"
    reference = bpe_tokenizer(f"<|im_start|>user\n{written}<|im_end|>\n", add_special_tokens=False)["input_ids"]
    start = len(bpe_tokenizer("<|im_start|>system\ns<|im_end|>\n", add_special_tokens=False)["input_ids"])
    assert result.input_ids[start : start + len(reference)] == reference


def test_placeholder_and_image_counts_must_agree(bpe_tokenizer):
    tokenizer = ConversationTokenizer(bpe_tokenizer)
    with pytest.raises(TemplateError, match="1 <image> placeholder"):
        tokenizer((Turn("human", "<image>\nhi"), Turn("gpt", "yes")), None, [16, 16])
    with pytest.raises(TemplateError, match="literally"):
        tokenizer((Turn("human", "look <IMG_CONTEXT>"), Turn("gpt", "yes")), None, [])


def test_tokenizer_without_image_tokens_is_refused_until_prepared():
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                        unk_token="[UNK]")
    with pytest.raises(TemplateError, match=r"lacks \['<img>', '</img>', '<IMG_CONTEXT>', '<\|im_start\|>'"):
        ConversationTokenizer(tokenizer)
    # as upstream: InternVL's 9 tokens, plus a pad token (none and no EOS here); ChatML is the tokenizer's business
    assert prepare_tokenizer(tokenizer) == 9 + 1 and tokenizer.pad_token == "<|endoftext|>"
    with pytest.raises(TemplateError, match=r"lacks \['<\|im_start\|>', '<\|im_end\|>'\]"):
        ConversationTokenizer(tokenizer)


def test_pad_token_defaults_to_eos_as_internlm2_does():
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1}, unk_token="[UNK]")),
                                        unk_token="[UNK]", eos_token="</s>")
    assert prepare_tokenizer(tokenizer) == 9 and tokenizer.pad_token == "</s>"


def _tokenized(length, spans, supervised_from):
    return TokenizedConversation(
        list(range(length)), [IGNORE_INDEX] * supervised_from + list(range(supervised_from, length)), spans
    )


def test_truncation_inside_an_image_is_a_problem():
    sample = _tokenized(100, [(10, 60)], supervised_from=80)
    assert truncation_problem(sample, 100) is None
    assert "would cut image 1" in truncation_problem(sample, 50)
    assert "no answer tokens left" in truncation_problem(sample, 70)
    assert truncation_problem(sample, 90) is None
    assert len(truncate(sample, 90).input_ids) == 90
