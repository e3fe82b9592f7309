"""InternVL's chat templates (``--conv_style``), image-token expansion and assistant-only labels.

Four templates, each with the label mask of the upstream function that trains it::

    internvl2_5      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n
                     <|im_start|>assistant\\n{a}<|im_end|>\\n            (preprocess_internvl2_5)
    Hermes-2         <|im_start|>system\\n{system}<|im_end|><|im_start|>user\\n{q}<|im_end|>
                     <|im_start|>assistant\\n{a}<|im_end|>               (preprocess_mpt)
    internlm2-chat   as Hermes-2, every message stripped, a BOS tokenizer (preprocess_internlm)
    phi3-chat        <|system|>\\n{system}<|end|><|user|>\\n{q}<|end|><|assistant|>\\n{a}<|end|>
                                                                        (preprocess_phi3)

internvl2_5 tokenises turn by turn: system and user turns are ignored (-100); in an assistant turn
the ``<|im_start|>assistant\\n`` header and the final ``\\n`` are ignored, the answer and
``<|im_end|>`` are learnt. A tokenizer with ``add_bos_token`` (InternLM2's) gets one BOS in front.

The other three tokenise the whole prompt at once and find the answers by counting the tokens of
pieces of the prompt, with each template's own offsets (BOS tokens, SentencePiece's leading ``▁``).
When the counts do not add up to the sequence, upstream trains on the sample with every label
ignored (a silent zero loss); here the sample is refused with a :class:`TemplateError` instead.

Every ``<image>`` becomes ``<img>`` + ``<IMG_CONTEXT>`` x (tokens of its tiles) + ``</img>``. The
prompt is tokenised with one ``<IMG_CONTEXT>`` per image, which is widened in id space afterwards:
special tokens are split off before BPE, so this gives upstream's ids and labels, much faster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vitp.data.meta import IMAGE_PLACEHOLDER, Turn
from vitp.errors import DataError

IGNORE_INDEX = -100
IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# InternVL's own additional tokens, added to the tokenizer exactly as upstream training does.
INTERNVL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>")
CHATML_TOKENS = ("<|endoftext|>", IM_START, IM_END)
PAD_TOKEN = "<|endoftext|>"
DEFAULT_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
# The default of the three older templates (InternVL2's), kept by upstream "to avoid changes in benchmarks".
INTERNVL2_SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
# The marker of a choice question for upstream's auxiliary classifier loss (--use_classifier).
CLASSIFY_MARKER = "<cls>"


class TemplateError(DataError):
    """A conversation the template cannot tokenise into correct labels."""


def prepare_tokenizer(tokenizer) -> int:
    """Add InternVL's image tokens as special tokens (as upstream training does) and make sure a pad
    token is set (the EOS token when there is one, as InternLM2 does, else ``<|endoftext|>``).
    Returns how many tokens were added (the LLM's embeddings must then be resized)."""
    vocabulary = tokenizer.get_vocab()
    missing = [token for token in INTERNVL_TOKENS if token not in vocabulary]
    added = tokenizer.add_tokens(missing, special_tokens=True) if missing else 0
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None and PAD_TOKEN not in tokenizer.get_vocab():
            added += tokenizer.add_tokens([PAD_TOKEN], special_tokens=True)
        tokenizer.pad_token = tokenizer.eos_token or PAD_TOKEN
    return added


@dataclass(frozen=True)
class ClassifyTarget:
    """Upstream's auxiliary choice loss for one sample: at ``position`` (the answer's first token)
    the logits of ``choice_ids`` (first tokens of the choices) are trained towards ``answer_id``."""

    position: int
    choice_ids: tuple[int, ...]
    answer_id: int


@dataclass(frozen=True)
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    image_spans: list[tuple[int, int]]  # [start, end) of each image's <img> ... </img> tokens
    classify: ClassifyTarget | None = None


@dataclass(frozen=True)
class TemplateStyle:
    """The strings of an MPT-style template (upstream's ``SeparatorStyle.MPT``)."""

    system: str  # with {system_message}
    user: str
    assistant: str
    separator: str
    default_system: str
    required_tokens: tuple[str, ...]


INTERNVL2_5 = TemplateStyle(f"{IM_START}system\n{{system_message}}", f"{IM_START}user\n", f"{IM_START}assistant\n",
                            f"{IM_END}\n", DEFAULT_SYSTEM_MESSAGE, (IM_START, IM_END))
CHATML = TemplateStyle(f"{IM_START}system\n{{system_message}}", f"{IM_START}user\n", f"{IM_START}assistant\n", IM_END,
                       INTERNVL2_SYSTEM_MESSAGE, (IM_START, IM_END))
PHI3 = TemplateStyle("<|system|>\n{system_message}", "<|user|>\n", "<|assistant|>\n", "<|end|>",
                     INTERNVL2_SYSTEM_MESSAGE, ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"))
STYLES = {"internvl2_5": INTERNVL2_5, "Hermes-2": CHATML, "internlm2-chat": CHATML, "phi3-chat": PHI3}
TEMPLATES = tuple(STYLES)


class ConversationTokenizer:
    """Tokenises conversations with one of upstream's templates for one tokenizer."""

    def __init__(self, tokenizer, template: str = "internvl2_5", default_system: str | None = None):
        if template not in STYLES:
            raise ValueError(f"template must be one of {', '.join(TEMPLATES)}, got {template!r}")
        self.tokenizer = tokenizer
        self.template = template
        self.style = STYLES[template]
        self.default_system = self.style.default_system if default_system is None else default_system
        needed = (IMG_START, IMG_END, IMG_CONTEXT) + self.style.required_tokens
        unknown = [token for token in needed if not self._is_token(token)]
        if unknown:
            raise TemplateError(f"the tokenizer lacks {unknown}, which the {template} template needs as single "
                                "tokens (InternVL's image tokens are added by prepare_tokenizer)")
        self.img_start_id, self.img_end_id = (tokenizer.convert_tokens_to_ids(t) for t in (IMG_START, IMG_END))
        self.img_context_id = tokenizer.convert_tokens_to_ids(IMG_CONTEXT)
        self.add_bos = bool(getattr(tokenizer, "add_bos_token", False))
        self.build: Callable[[list[Turn], str], tuple[list[int], list[int], int]] = {
            "internvl2_5": self._internvl2_5, "Hermes-2": self._hermes2, "internlm2-chat": self._internlm2,
            "phi3-chat": self._phi3,
        }[template]

    def _is_token(self, token: str) -> bool:
        value = self.tokenizer.convert_tokens_to_ids(token)
        return value is not None and value != self.tokenizer.unk_token_id

    def _encode(self, texts: str | list[str]):
        """Token ids as upstream gets them: ``tokenizer(text).input_ids``, special tokens included."""
        try:
            return self.tokenizer(texts)["input_ids"]
        except (TypeError, ValueError, UnicodeError) as err:  # e.g. a lone surrogate the tokenizer refuses
            raise TemplateError(f"the tokenizer cannot encode this text ({type(err).__name__}: {err})") from None

    def _count(self, text: str) -> int:
        return len(self._encode(text))

    def __call__(self, turns: tuple[Turn, ...], system: str | None, image_token_counts: list[int],
                 classify: bool = False) -> TokenizedConversation:
        """Tokenise; ``image_token_counts[k]`` is the number of <IMG_CONTEXT> tokens of the k-th image.
        With ``classify``, a ``<cls>`` question also yields upstream's choice target (internvl2_5)."""
        system = self.default_system if system is None else system
        if IMAGE_PLACEHOLDER in system:
            raise TemplateError(f"the system message contains {IMAGE_PLACEHOLDER}; images belong in human turns")
        for turn in turns:
            literal = [token for token in (IMG_START, IMG_END, IMG_CONTEXT) if token in turn.text]
            if literal:
                raise TemplateError(f"the text contains the image token(s) {literal} literally; use {IMAGE_PLACEHOLDER}")
        placeholders = sum(turn.text.count(IMAGE_PLACEHOLDER) for turn in turns)
        if placeholders != len(image_token_counts):
            raise TemplateError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholder(s) for {len(image_token_counts)} image(s)")
        compact = [Turn(t.role, t.text.replace(IMAGE_PLACEHOLDER, IMG_START + IMG_CONTEXT + IMG_END)) for t in turns]
        ids, labels, answer_start = self.build(compact, system)
        ids, labels, shifts = self._widen(ids, labels, image_token_counts)
        target = None
        if classify:
            target = self._classify_target(turns, answer_start + shifts(answer_start))
        return TokenizedConversation(ids, labels, self._image_spans(ids), target)

    # ----------------------------------------------------------------------------------------------
    # internvl2_5: turn by turn (upstream's preprocess_internvl2_5)

    def _internvl2_5(self, turns: list[Turn], system: str) -> tuple[list[int], list[int], int]:
        style = self.style
        texts = [f"{IM_START}system\n{system}{IM_END}\n"]
        texts += [f"{style.user if t.role == 'human' else style.assistant}{t.text}{IM_END}\n" for t in turns]
        if self.add_bos:  # InternLM2: one BOS in front of the whole conversation, none per turn
            texts[0] = self.tokenizer.bos_token + texts[0]
        pieces = self._encode(texts)
        if self.add_bos:
            pieces = [piece[1:] for piece in pieces]
        header = self._encode(style.assistant)
        header_length = len(header) - 1 if self.add_bos else len(header)
        ids: list[int] = []
        labels: list[int] = []
        answer_start = 0
        for role, piece in zip(["system"] + [t.role for t in turns], pieces):
            if role == "gpt":
                if piece[:header_length] != header[len(header) - header_length:]:
                    # a tokenizer that merged the header with the answer would shift every label
                    raise TemplateError("the tokenizer merges the assistant header with the answer; labels would be "
                                        "misaligned")
                answer_start = len(ids) + header_length
                target = list(piece)
                target[:header_length] = [IGNORE_INDEX] * min(header_length, len(target))
                target[-1:] = [IGNORE_INDEX]
                labels += target
            else:
                labels += [IGNORE_INDEX] * len(piece)
            ids += piece
        return ids, labels, answer_start

    # ----------------------------------------------------------------------------------------------
    # Whole-prompt templates: the labels come from counting tokens of prompt pieces

    def _prompt(self, turns: list[Turn], system: str) -> str:
        """Upstream's MPT prompt: system + separator, then role + message + separator per turn (a role
        alone for an empty message)."""
        style = self.style
        prompt = style.system.format(system_message=system) + style.separator
        for turn in turns:
            role = style.user if turn.role == "human" else style.assistant
            prompt += role + turn.text + style.separator if turn.text else role
        return prompt

    def _tokenize_prompt(self, prompt: str) -> tuple[list[int], list[int]]:
        ids = list(self._encode(prompt))
        return ids, list(ids)

    def _rounds(self, prompt: str) -> list[str]:
        """The prompt cut at the separators into rounds: system + first question + answer, then
        question + answer (upstream's re_turns); the separators themselves are left out."""
        parts = prompt.split(self.style.separator)
        rounds = [self.style.separator.join(parts[:3])]
        rounds += [self.style.separator.join(parts[i : i + 2]) for i in range(3, len(parts), 2)]
        return rounds

    def _check_total(self, cursor: int, ids: list[int]) -> None:
        """Upstream's consistency check: the counted pieces must cover every non-pad token."""
        total = sum(1 for token in ids if token != self.tokenizer.pad_token_id)
        if cursor != total:
            raise TemplateError(
                f"tokenization mismatch for the {self.template} template: the turns count {cursor} tokens but the "
                f"conversation has {total} (upstream trains such a sample with every label ignored)"
            )

    def _hermes2(self, turns: list[Turn], system: str) -> tuple[list[int], list[int], int]:
        """preprocess_mpt: each round is counted with one token for the separator the split removed."""
        prompt = self._prompt(turns, system)
        ids, labels = self._tokenize_prompt(prompt)
        cursor, answer_start = self._mask_rounds(prompt, labels, 0, round_extra=(1, 1), header_extra=(0, 0))
        self._check_total(cursor, ids)
        return ids, labels, answer_start

    def _mask_rounds(self, prompt: str, labels: list[int], cursor: int, round_extra: tuple[int, int],
                     header_extra: tuple[int, int]) -> tuple[int, int]:
        """Walk the rounds from ``cursor``, ignoring each question up to and including the assistant
        header. A round spans its token count plus ``round_extra``, its question its token count plus
        ``header_extra`` (the first value for the first round, the second for the others): the
        template's corrections for the separator the split removed, BOS and leading-space tokens.
        Returns the cursor after the last round and where the last answer starts."""
        answer_header = self.style.separator + self.style.assistant
        answer_start = cursor
        for index, text in enumerate(self._rounds(prompt)):
            if text == "":
                break
            length = self._count(text) + round_extra[index > 0]
            halves = text.split(answer_header)
            if len(halves) != 2:
                break
            masked = self._count(halves[0] + answer_header) + header_extra[index > 0]
            labels[cursor : cursor + masked] = [IGNORE_INDEX] * len(labels[cursor : cursor + masked])
            answer_start = cursor + masked
            cursor += length
        labels[cursor:] = [IGNORE_INDEX] * len(labels[cursor:])
        return cursor, answer_start

    def _internlm2(self, turns: list[Turn], system: str) -> tuple[list[int], list[int], int]:
        """preprocess_internlm: messages stripped; cut at the assistant header; every count drops the
        tokenizer's BOS."""
        turns = [Turn(t.role, t.text.strip()) for t in turns]
        prompt = self._prompt(turns, system)
        ids, labels = self._tokenize_prompt(prompt)
        user, assistant = self.style.user, self.style.assistant

        def ignore(start: int, count: int) -> None:
            labels[start : start + count] = [IGNORE_INDEX] * len(labels[start : start + count])

        parts = prompt.split(assistant)
        ignore(0, 1)  # the BOS
        cursor = 1
        masked = self._count(parts[0] + assistant) - 1
        ignore(cursor, masked)
        cursor += masked
        answer_start = cursor
        for part in parts[1:-1]:
            pieces = part.split(user)
            if len(pieces) != 2:
                raise TemplateError(f"the {self.template} template cannot find the next question after an answer "
                                    f"(the answer contains {user!r})")
            answer, question = pieces
            cursor += self._count(answer) - 1
            masked = self._count(user + question + assistant) - 1
            ignore(cursor, masked)
            cursor += masked
            answer_start = cursor
        cursor += self._count(parts[-1]) - 1
        ignore(cursor, len(labels))
        self._check_total(cursor, ids)
        return ids, labels, answer_start

    def _phi3(self, turns: list[Turn], system: str) -> tuple[list[int], list[int], int]:
        """preprocess_phi3: rounds as Hermes-2, with Phi-3's offsets (its BOS and the leading ``▁`` of
        a piece tokenised on its own); ``<|endoftext|>`` tokens are never learnt."""
        prompt = self._prompt(turns, system)
        ids, labels = self._tokenize_prompt(prompt)
        labels[:1] = [IGNORE_INDEX] * len(labels[:1])
        endoftext = self.tokenizer.convert_tokens_to_ids(PAD_TOKEN)
        labels[:] = [IGNORE_INDEX if label == endoftext else label for label in labels]
        cursor, answer_start = self._mask_rounds(prompt, labels, 1, round_extra=(0, -1), header_extra=(-1, -2))
        self._check_total(cursor, ids)
        return ids, labels, answer_start

    # ----------------------------------------------------------------------------------------------
    # Images and the classifier target

    def _widen(self, ids: list[int], labels: list[int], counts: list[int]):
        """Each <IMG_CONTEXT> (one per image) becomes its image's count of them, label ignored.
        Also returns a function from a compact position to the tokens inserted before it."""
        wide_ids: list[int] = []
        wide_labels: list[int] = []
        inserted: list[tuple[int, int]] = []  # (compact position, tokens inserted there)
        image = 0
        for position, (token, label) in enumerate(zip(ids, labels)):
            if token == self.img_context_id:
                wide_ids += [token] * counts[image]
                wide_labels += [IGNORE_INDEX] * counts[image]
                inserted.append((position, counts[image] - 1))
                image += 1
            else:
                wide_ids.append(token)
                wide_labels.append(label)
        return wide_ids, wide_labels, lambda at: sum(extra for position, extra in inserted if position < at)

    def _classify_target(self, turns: tuple[Turn, ...], answer_start: int) -> ClassifyTarget | None:
        """Upstream's choice target: the choices are the text of the last ``<cls>`` question after its
        first ': ' up to the first '.', split on '|', plus every later answer; the target is the first
        token of the last answer. Only samples with a ``<cls>`` question get one (upstream computes a
        zero-weight one-choice loss for the others), and first tokens are taken without the BOS."""
        if self.template != "internvl2_5":
            return None
        choices: list[str] | None = None
        answer = ""
        for turn in turns:
            if turn.role == "human" and CLASSIFY_MARKER in turn.text:
                fields = turn.text.split(": ")
                if len(fields) >= 2:
                    choices = fields[1].split(".")[0].split("|")
            elif turn.role == "gpt" and choices is not None:
                choices.append(turn.text)
                answer = turn.text
        if choices is None or not answer:
            return None

        def first_token(text: str) -> int | None:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            return ids[0] if ids else None

        choice_ids = sorted({token for token in map(first_token, choices) if token is not None})
        return ClassifyTarget(answer_start, tuple(choice_ids), first_token(answer))

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
    classify = tokenized.classify if tokenized.classify and tokenized.classify.position < max_length else None
    return TokenizedConversation(
        tokenized.input_ids[:max_length], tokenized.labels[:max_length], tokenized.image_spans, classify
    )
