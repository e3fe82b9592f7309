"""A small byte-level BPE tokenizer trained on the fly, for tests and CPU demos.

Real runs use the LLM's own tokenizer (Qwen2/2.5 from the checkpoint directory). A tiny model trained
from scratch needs a tiny vocabulary instead, trained here on the conversation text with the
`tokenizers` library; ChatML and InternVL's image tokens are special tokens, so the template and the
image-token expansion behave exactly as with the real tokenizer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vitp.data.meta import IMAGE_PLACEHOLDER, JsonlIndex, SampleError, parse_sample, read_meta
from vitp.data.template import CHATML_TOKENS, DEFAULT_SYSTEM_MESSAGE, INTERNVL_TOKENS, prepare_tokenizer
from vitp.errors import VitpError


class TokenizerError(VitpError):
    pass


class NoTextError(TokenizerError):
    """Nothing to train on: every text was empty (or there was none)."""


SPECIAL_TOKENS = CHATML_TOKENS + INTERNVL_TOKENS
# The trainer always keeps every byte and every special token, whatever vocab_size asks for.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 2**32 - 1  # the tokenizers library stores sizes as u32


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerError(
            f"--vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), "
            f"got {vocab_size}"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise TokenizerError(f"--vocab_size must be at most {MAX_VOCAB_SIZE}, got {vocab_size}")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 400, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE over ``texts`` (plus InternVL's default system message) with the special tokens.
    TokenizerError for a ``vocab_size`` below :data:`MIN_VOCAB_SIZE`; NoTextError if ``texts`` has no text."""
    check_vocab_size(vocab_size)
    specials = list(SPECIAL_TOKENS)
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

    texts_with_content = 0

    def corpus() -> Iterator[str]:
        nonlocal texts_with_content
        yield DEFAULT_SYSTEM_MESSAGE
        for text in texts:
            texts_with_content += bool(text.strip())
            yield text

    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    if not texts_with_content:  # a vocabulary of the default system message alone is no tokenizer for this data
        raise NoTextError("no text to train a tokenizer on")
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


def train_tokenizer_on_meta(meta_path: str | Path, vocab_size: int = 400) -> tuple[PreTrainedTokenizerFast, Counter]:
    """A tokenizer over the conversations of a meta file, and the skipped lines counted by kind.
    TokenizerError, saying how many lines were skipped and why, if no usable text was found."""
    skipped: Counter = Counter()
    try:  # train_tokenizer checks vocab_size before it pulls the first text from the (lazy) generator
        tokenizer = train_tokenizer(conversation_texts(meta_path, skipped), vocab_size=vocab_size)
    except NoTextError:
        found = f"skipped {skipped_summary(skipped)}" if skipped else "no line of the annotation files has any text"
        raise TokenizerError(
            f"{meta_path}: no usable conversation text to train a tokenizer on ({found}); "
            f"`vitp data check {meta_path}` lists every bad line"
        ) from None
    return tokenizer, skipped


def skipped_summary(skipped: Counter) -> str:
    """'3 line(s): invalid JSON 2, invalid text 1'."""
    kinds = ", ".join(f"{kind} {count}" for kind, count in skipped.most_common())
    return f"{sum(skipped.values())} line(s): {kinds}"


def conversation_texts(meta_path: str | Path, skipped: Counter | None = None) -> Iterator[str]:
    """The text of every turn of every usable line of the datasets of a meta file; unusable lines are
    counted by kind in ``skipped`` (`vitp data check` reports each one)."""
    for spec in read_meta(meta_path):
        for where, raw in JsonlIndex(spec.annotation):
            try:
                sample = parse_sample(raw, where)
            except SampleError as err:
                if skipped is not None:
                    skipped[err.kind] += 1
                continue  # a tokenizer just needs the good text
            if sample.system:
                yield sample.system
            for turn in sample.turns:
                yield turn.text.replace(IMAGE_PLACEHOLDER, "")


def load_tokenizer(path: str | Path, use_fast: bool = True):
    """A Hugging Face tokenizer from a directory, with ChatML and InternVL's tokens ensured.
    ``use_fast`` is upstream's --use_fast_tokenizer (the Rust tokenizer where both exist)."""
    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"{path}: not a tokenizer directory")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=use_fast)
    except (OSError, ValueError) as err:
        raise TokenizerError(f"{path}: cannot load a tokenizer ({err})") from None
    prepare_tokenizer(tokenizer)
    return tokenizer
