"""Tokenizers: the LLM's own, loaded without running remote code, and a small one trained on the fly.

Real runs use the LLM's own tokenizer from the checkpoint directory (:func:`load_tokenizer`). Remote
code never runs: a directory whose tokenizer is InternLM2's remote code (``tokenization_internlm2.py``
over a sentencepiece ``tokenizer.model``, InternVL2-2B/8B/26B and InternVL2.5-2B/8B/26B) gets the same
tokenizer rebuilt from its ``tokenizer.model`` with the ``tokenizers`` library (the same ids, the same
BOS), and any other remote-code tokenizer is refused with a message instead of transformers' interactive
"Do you wish to run the custom code?" prompt, which would hang a batch job.

A tiny model trained from scratch needs a tiny vocabulary instead, trained here on the conversation text
with the `tokenizers` library; ChatML and InternVL's image tokens are special tokens, so the template and
the image-token expansion behave exactly as with the real tokenizer.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vitp.data.meta import IMAGE_PLACEHOLDER, JsonlIndex, SampleError, parse_sample, read_meta
from vitp.data.templates import CHATML_TOKENS, DEFAULT_SYSTEM_MESSAGE, INTERNVL_TOKENS, prepare_tokenizer
from vitp.errors import DataError
from vitp.files import read_json


SPECIAL_TOKENS = CHATML_TOKENS + INTERNVL_TOKENS
# The trainer always keeps every byte and every special token, whatever vocab_size asks for.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
MAX_VOCAB_SIZE = 2**32 - 1  # the tokenizers library stores sizes as u32


def train_tokenizer(texts: Iterable[str], vocab_size: int = 400, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """A byte-level BPE over ``texts`` (plus InternVL's default system message) with the special tokens.
    ValueError for a ``vocab_size`` outside [:data:`MIN_VOCAB_SIZE`, :data:`MAX_VOCAB_SIZE`]; DataError if
    ``texts`` has no text."""
    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise ValueError(f"vocab_size {vocab_size}: must be from {MIN_VOCAB_SIZE} (256 bytes + "
                         f"{len(SPECIAL_TOKENS)} special tokens) to {MAX_VOCAB_SIZE}")
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
        raise DataError("no text to train a tokenizer on")
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
    DataError, saying how many lines were skipped and why, if no usable text was found."""
    skipped: Counter = Counter()
    read_all = False

    def texts() -> Iterator[str]:
        nonlocal read_all
        yield from conversation_texts(meta_path, skipped)
        read_all = True

    try:
        tokenizer = train_tokenizer(texts(), vocab_size=vocab_size)
    except DataError:
        if not read_all:  # the meta file itself is wrong: its own message says where
            raise
        found = f"skipped {skipped_summary(skipped)}" if skipped else "no line of the annotation files has any text"
        raise DataError(
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
    """A Hugging Face tokenizer from a directory, with ChatML and InternVL's tokens ensured; never runs
    remote code and never prompts. ``use_fast`` is upstream's --use_fast_tokenizer (the Rust tokenizer
    where both exist; InternLM2's rebuilt tokenizer is always the Rust one, with the slow one's ids)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a tokenizer directory")
    config = _tokenizer_config(path)
    declared = _declared_classes(config)
    try:
        if declared & SENTENCEPIECE_REMOTE_CLASSES:
            tokenizer = sentencepiece_bpe_tokenizer(path, config)
        else:
            tokenizer = AutoTokenizer.from_pretrained(path, use_fast=use_fast, trust_remote_code=False)
    except (OSError, ValueError) as err:
        if "custom code" in str(err) or "trust_remote_code" in str(err):
            raise DataError(
                f"{path}: the tokenizer is remote code ({', '.join(sorted(declared)) or 'auto_map'}), which vitp "
                f"does not run; vitp rebuilds {', '.join(sorted(SENTENCEPIECE_REMOTE_CLASSES))} itself, and loads "
                f"any tokenizer transformers ships"
            ) from None
        raise DataError(f"{path}: cannot load a tokenizer ({err})") from None
    prepare_tokenizer(tokenizer)
    return tokenizer


# Remote-code tokenizers over a sentencepiece BPE model that vitp rebuilds with the tokenizers library.
SENTENCEPIECE_REMOTE_CLASSES = frozenset({"InternLM2Tokenizer", "InternLM2TokenizerFast"})


def _tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    if not path.is_file():
        return {}
    return read_json(path, DataError, object_only=True)


def _declared_classes(config: dict[str, Any]) -> set[str]:
    """The tokenizer class names a tokenizer_config.json names (tokenizer_class and its auto_map)."""
    names = {config.get("tokenizer_class")}
    auto_map = config.get("auto_map")
    entries = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map
    for entry in entries if isinstance(entries, (list, tuple)) else [entries]:
        if isinstance(entry, str):
            names.add(entry.rsplit(".", 1)[-1])
    return {name for name in names if isinstance(name, str)}


def sentencepiece_bpe_tokenizer(directory: Path, config: dict[str, Any]) -> PreTrainedTokenizerFast:
    """The tokenizer of a sentencepiece BPE ``tokenizer.model`` as InternLM2's remote code applies it
    (each text between special tokens encoded by sentencepiece; BOS first when ``add_bos_token``, the
    default), rebuilt with the tokenizers library: the sentencepiece vocabulary and merges, sentencepiece's
    whitespace handling as a normaliser, byte fallback, and the ``added_tokens_decoder`` of
    ``tokenizer_config.json`` at their ids (InternLM2 renames unused pieces to ``<|im_start|>`` etc.)."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    from transformers.tokenization_utils_base import generate_merges

    model_file = directory / "tokenizer.model"
    if not model_file.is_file():
        raise DataError(f"{directory}: no tokenizer.model (the sentencepiece model this tokenizer reads)")
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
        processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
    except Exception as err:  # noqa: BLE001 - protobuf and sentencepiece raise their own types
        raise DataError(f"{model_file}: not a readable sentencepiece model ({err})") from None
    spec = proto.normalizer_spec
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise DataError(f"{model_file}: a sentencepiece model of type {proto.trainer_spec.model_type}, not BPE")
    if spec.name not in ("identity", "") or spec.remove_extra_whitespaces or not spec.escape_whitespaces:
        raise DataError(
            f"{model_file}: sentencepiece normalisation {spec.name!r} (remove_extra_whitespaces="
            f"{spec.remove_extra_whitespaces}) cannot be rebuilt exactly; vitp rebuilds identity-normalised models"
        )
    size = processor.get_piece_size()
    pieces = [processor.id_to_piece(i) for i in range(size)]
    added = _added_tokens(config)
    renamed = {i: token.content for i, token in added.items() if i < size}
    merges = generate_merges(
        {piece: i for i, piece in enumerate(pieces)},
        {piece: processor.get_score(i) for i, piece in enumerate(pieces)},
        skip_tokens=[pieces[i] for i in renamed],
    )
    vocab = {renamed.get(i, piece): i for i, piece in enumerate(pieces)}
    backend = Tokenizer(models.BPE(
        vocab, merges, unk_token=pieces[processor.unk_id()], fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback
    ))
    dummy_prefix = [normalizers.Prepend("▁")] if spec.add_dummy_prefix else []
    backend.normalizer = normalizers.Sequence(dummy_prefix + [normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if spec.add_dummy_prefix else [])
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=_token_text(config.get("bos_token", "<s>")),
        eos_token=_token_text(config.get("eos_token", "</s>")),
        unk_token=_token_text(config.get("unk_token", "<unk>")),
        pad_token=_token_text(config.get("pad_token", "</s>")),
        add_bos_token=bool(config.get("add_bos_token", True)),
        add_eos_token=False,  # as upstream's trainer loads it
        model_max_length=config.get("model_max_length", 1_000_000),
        clean_up_tokenization_spaces=False,
    )
    for index in sorted(added):
        token = added[index]
        tokenizer.add_tokens([token], special_tokens=token.special)
        if tokenizer.convert_tokens_to_ids(token.content) != index:
            raise DataError(
                f"{directory / 'tokenizer_config.json'}: added token {token.content!r} has id {index}, which does not "
                f"follow the {size} pieces of tokenizer.model and the tokens before it"
            )
    if config.get("chat_template"):
        tokenizer.chat_template = config["chat_template"]
    return tokenizer


def _added_tokens(config: dict[str, Any]) -> dict[int, AddedToken]:
    out = {}
    for key, value in (config.get("added_tokens_decoder") or {}).items():
        if not isinstance(value, dict) or "content" not in value or not str(key).isdigit():
            raise DataError(f"tokenizer_config.json: added_tokens_decoder[{key!r}] is not {{id: {{content...}}}}")
        out[int(key)] = AddedToken(
            value["content"], special=bool(value.get("special", True)), normalized=bool(value.get("normalized", False)),
            lstrip=bool(value.get("lstrip", False)), rstrip=bool(value.get("rstrip", False)),
            single_word=bool(value.get("single_word", False)),
        )
    return out


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value
