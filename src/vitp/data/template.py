"""The ``internvl2_5`` chat template (ChatML), image-token expansion and assistant-only labels.

A conversation becomes, turn by turn (each turn tokenised on its own, as upstream does)::

    <|im_start|>system\\n{system}<|im_end|>\\n
    <|im_start|>user\\n<img><IMG_CONTEXT>×N</img>\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n

Labels are -100 (ignored) for the system and user turns and every image token; in an assistant turn
the ``<|im_start|>assistant\\n`` header and the final ``\\n`` are ignored, so the model learns the
answer text and ``<|im_end|>``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vitp.data.meta import IMAGE_PLACEHOLDER, Turn
from vitp.errors import VitpError

IGNORE_INDEX = -100
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# InternVL's own additional tokens, added to the tokenizer exactly as upstream training does.
INTERNVL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
CHATML_TOKENS = ("<|endoftext|>", IM_START, IM_END)
DEFAULT_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
ASSISTANT_HEADER = f"{IM_START}assistant\n"


class TemplateError(VitpError):
    """The tokenizer cannot express the template (missing tokens, merges across turn boundaries)."""


def prepare_tokenizer(tokenizer) -> int:
    """Make sure ChatML and InternVL's image tokens exist as special tokens and a pad token is set.
    Returns how many tokens were added (the LLM's embeddings must then be resized)."""
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in CHATML_TOKENS + INTERNVL_TOKENS if token not in vocabulary]
    added = tokenizer.add_tokens(missing, special_tokens=True) if missing else 0
    if tokenizer.pad_token is None:
        tokenizer.pad_token = "<|endoftext|>"
    return added


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]  # [start, end) of each image's <img> ... </img> tokens


class ConversationTokenizer:
    """Tokenises conversations with the internvl2_5 template for one tokenizer."""

    def __init__(self, tokenizer, default_system: str | None = DEFAULT_SYSTEM_MESSAGE):
        self.tokenizer = tokenizer
        self.default_system = default_system
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (IMG_START, IMG_END, IMG_CONTEXT, IM_END)}
        unknown = [token for token, value in ids.items() if value is None or value == tokenizer.unk_token_id]
        if unknown:
            raise TemplateError(f"the tokenizer lacks {unknown}; call prepare_tokenizer(tokenizer) first")
        self.img_start_id, self.img_end_id = ids[IMG_START], ids[IMG_END]
        self.img_context_id, self.im_end_id = ids[IMG_CONTEXT], ids[IM_END]
        self.header_ids = self._encode(ASSISTANT_HEADER)
        self.newline_ids = self._encode("\n")
        if len(self.newline_ids) != 1:
            raise TemplateError(f"the tokenizer encodes '\\n' as {len(self.newline_ids)} tokens; expected 1")

    def _encode(self, text: str) -> list[int]:
        try:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        except (TypeError, ValueError, UnicodeError) as err:  # e.g. a lone surrogate the tokenizer refuses
            raise TemplateError(f"the tokenizer cannot encode this text ({type(err).__name__}: {err})") from None

    def __call__(
        self, turns: tuple[Turn, ...], system: str | None, image_token_counts: list[int]
    ) -> TokenizedConversation:
        """Tokenise; ``image_token_counts[k]`` is the number of <IMG_CONTEXT> tokens of the k-th image."""
        system = system if system is not None else self.default_system
        input_ids: list[int] = []
        labels: list[int] = []
        if system is not None:
            ids = self._encode(f"{IM_START}system\n{system}{IM_END}\n")
            input_ids += ids
            labels += [IGNORE_INDEX] * len(ids)
        images_used = 0
        for turn in turns:
            literal = [token for token in (IMG_START, IMG_END, IMG_CONTEXT) if token in turn.text]
            if literal:
                raise TemplateError(f"the text contains the image token(s) {literal} literally; use {IMAGE_PLACEHOLDER}")
            if turn.role == "human":
                ids, images_used = self._user_turn(turn.text, image_token_counts, images_used)
                input_ids += ids
                labels += [IGNORE_INDEX] * len(ids)
            else:
                ids = self._encode(f"{ASSISTANT_HEADER}{turn.text}{IM_END}\n")
                self._check_assistant_boundaries(ids, turn.text)
                input_ids += ids
                labels += [IGNORE_INDEX] * len(self.header_ids) + ids[len(self.header_ids) : -1] + [IGNORE_INDEX]
        if images_used != len(image_token_counts):
            raise TemplateError(f"{images_used} {IMAGE_PLACEHOLDER} placeholder(s) for {len(image_token_counts)} image(s)")
        return TokenizedConversation(input_ids, labels, self._image_spans(input_ids))

    def _user_turn(self, text: str, counts: list[int], used: int) -> tuple[list[int], int]:
        """Tokenise a user turn with each <image> as <img><IMG_CONTEXT></img>, then widen each single
        <IMG_CONTEXT> to its image's token count. Added tokens are split out before BPE, so this gives
        the same ids as writing all N context tokens into the text (as upstream does), much faster."""
        pieces = text.split(IMAGE_PLACEHOLDER)
        text = (IMG_START + IMG_CONTEXT + IMG_END).join(pieces)
        ids = self._encode(f"{IM_START}user\n{text}{IM_END}\n")
        expanded: list[int] = []
        for token in ids:
            if token == self.img_context_id:
                if used >= len(counts):
                    raise TemplateError(f"more {IMAGE_PLACEHOLDER} placeholders than images ({len(counts)})")
                expanded += [token] * counts[used]
                used += 1
            else:
                expanded.append(token)
        return expanded, used

    def _check_assistant_boundaries(self, ids: list[int], answer: str) -> None:
        # Masking counts the header's tokens and the last token; a tokenizer that merged text across
        # these boundaries would silently shift the labels, so refuse it.
        if ids[: len(self.header_ids)] != self.header_ids or ids[-2:] != [self.im_end_id] + self.newline_ids:
            raise TemplateError(
                f"the tokenizer merges the assistant header or the closing '<|im_end|>\\n' with the answer "
                f"{answer[:40]!r}; labels would be misaligned"
            )

    def _image_spans(self, ids: list[int]) -> list[tuple[int, int]]:
        spans, start = [], None
        for position, token in enumerate(ids):
            if token == self.img_start_id:
                start = position
            elif token == self.img_end_id and start is not None:
                spans.append((start, position + 1))
                start = None
        return spans


def truncation_problem(tokenized: TokenizedConversation, max_length: int) -> str | None:
    """Why cutting to ``max_length`` would make this sample unusable, or None if it is fine.

    Upstream keeps training on a sample whose image tokens were cut, with its loss multiplied by 0
    (users see mysterious zero losses); here such a sample is dropped and counted instead."""
    if len(tokenized.input_ids) <= max_length:
        return None
    for index, (start, end) in enumerate(tokenized.image_spans):
        if end > max_length:
            return f"truncation to max_seq_length {max_length} would cut image {index + 1} (tokens {start}-{end})"
    if all(label == IGNORE_INDEX for label in tokenized.labels[:max_length]):
        return f"no answer tokens left after truncation to max_seq_length {max_length}"
    return None


def truncate(tokenized: TokenizedConversation, max_length: int) -> TokenizedConversation:
    return TokenizedConversation(
        tokenized.input_ids[:max_length], tokenized.labels[:max_length], tokenized.image_spans
    )
