"""A small byte-level BPE tokenizer trained on the fly, for tests and CPU demos.

Real runs use the LLM's own tokenizer (Qwen2/2.5 from the checkpoint directory). A tiny model trained
from scratch needs a tiny vocabulary instead, trained here on the conversation text with the
`tokenizers` library; ChatML and InternVL's image tokens are special tokens, so the template and the
image-token expansion behave exactly as with the real tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vitp.data.meta import IMAGE_PLACEHOLDER, JsonlIndex, SampleError, parse_sample, read_meta
from vitp.data.template import CHATML_TOKENS, DEFAULT_SYSTEM_MESSAGE, INTERNVL_TOKENS, prepare_tokenizer
from vitp.errors import VitpError


class TokenizerError(VitpError):
    pass


def train_tokenizer(texts: Iterable[str], vocab_size: int = 400, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE over ``texts`` (plus InternVL's default system message) with the special tokens."""
    specials = list(CHATML_TOKENS + INTERNVL_TOKENS)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )

    def corpus() -> Iterable[str]:
        yield DEFAULT_SYSTEM_MESSAGE
        yield from texts

    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=specials[1:],
        model_max_length=1_000_000,
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    return directory


def conversation_texts(meta_path: str | Path) -> Iterable[str]:
    """The text of every turn of every usable line of the datasets of a meta file."""
    for spec in read_meta(meta_path):
        for where, raw in JsonlIndex(spec.annotation):
            try:
                sample = parse_sample(raw, where)
            except SampleError:
                continue  # `vitp data check` reports these; a tokenizer just needs the good text
            if sample.system:
                yield sample.system
            for turn in sample.turns:
                yield turn.text.replace(IMAGE_PLACEHOLDER, "")


def load_tokenizer(path: str | Path):
    """A Hugging Face tokenizer from a directory, with ChatML and InternVL's tokens ensured."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: not a tokenizer directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{path}: cannot load a tokenizer ({err})") from None
    prepare_tokenizer(tokenizer)
    return tokenizer
