"""The four templates against upstream's label masks, token for token.

Each ``upstream_*`` function below re-states, independently of vitp's code, what InternVL's
``preprocess_internvl2_5`` / ``preprocess_mpt`` (Hermes-2) / ``preprocess_internlm`` /
``preprocess_phi3`` do: write the whole prompt with every ``<IMG_CONTEXT>`` token spelled out, tokenise
it as upstream calls the tokenizer, and mask by counting the tokens of prompt pieces. Upstream marks a
sample whose counts do not add up by ignoring every label; vitp refuses it (TemplateError).

Tokenizers are trained here: a ChatML byte-level BPE (Qwen2-like), the same with ``add_bos_token``
(InternLM2-like), and a Phi-3-like one that adds ``<s>`` and SentencePiece's ``▁`` in front of every
text it tokenises.
"""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from vitp.data.meta import Turn
from vitp.data.templates import ConversationTokenizer, TemplateError, prepare_tokenizer

IGNORE = -100
IMG = "<img>", "<IMG_CONTEXT>", "</img>"
CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PHI3 = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEXT = ["What is in this image? A harbour with many boats.", "Describe the scene. Farmland, forest and sea.",
        "Which class is it? water", "Compare the two images. The first is greener.", "Yes, it is."] * 20
SYSTEM_INTERNVL2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
DEFAULT_SYSTEM = {  # upstream conversation.py's system_message of each template
    "internvl2_5": "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。",
    "Hermes-2": SYSTEM_INTERNVL2, "internlm2-chat": SYSTEM_INTERNVL2, "phi3-chat": SYSTEM_INTERNVL2,
}


def bpe(specials, bos=None, post=None, add_bos_token=False):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TEXT + [SYSTEM_INTERNVL2], trainer=trainer)
    if post:
        backend.post_processor = processors.TemplateProcessing(
            single=post, special_tokens=[(t, backend.token_to_id(t)) for t in post.split() if t != "$A"])
    extra = {"add_bos_token": True} if add_bos_token else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=specials[2],
                                        pad_token="<|endoftext|>", model_max_length=100_000, **extra)
    prepare_tokenizer(tokenizer)
    return tokenizer


@pytest.fixture(scope="module")
def qwen_like():
    return bpe(CHATML)


@pytest.fixture(scope="module")
def internlm_like():
    tokenizer = bpe(CHATML + ["<s>"], bos="<s>", add_bos_token=True)
    assert tokenizer("hi")["input_ids"][0] == tokenizer.bos_token_id and tokenizer.add_bos_token
    return tokenizer


@pytest.fixture(scope="module")
def phi3_like():
    tokenizer = bpe(PHI3 + ["<s>", "▁"], bos="<s>", post="<s> ▁ $A")
    assert tokenizer.convert_ids_to_tokens(tokenizer("<|user|>\nhi")["input_ids"][:3]) == ["<s>", "▁", "<|user|>"]
    return tokenizer


# ------------------------------------------------------------------------------------------------
# Upstream's algorithms, re-stated


def spelled_out(text, counts, used):
    """Replace each <image> by <img> + <IMG_CONTEXT> x its count + </img>, in order."""
    while "<image>" in text and used < len(counts):
        text = text.replace("<image>", IMG[0] + IMG[1] * counts[used] + IMG[2], 1)
        used += 1
    return text, used


def upstream_internvl2_5(tokenizer, turns, system, counts):
    texts, roles, used = [f"<|im_start|>system\n{system}<|im_end|>\n"], ["system"], 0
    for turn in turns:
        if turn.role == "human":
            value, used = spelled_out(turn.text, counts, used)
            texts.append(f"<|im_start|>user\n{value}<|im_end|>\n")
        else:
            texts.append(f"<|im_start|>assistant\n{turn.text}<|im_end|>\n")
        roles.append(turn.role)
    bos = getattr(tokenizer, "add_bos_token", False)
    if bos:
        texts[0] = tokenizer.bos_token + texts[0]
    pieces = tokenizer(texts, padding=False, truncation=False).input_ids
    if bos:
        pieces = [p[1:] for p in pieces]
    header = len(tokenizer("<|im_start|>assistant\n").input_ids) - (1 if bos else 0)
    ids, labels = [], []
    for role, piece in zip(roles, pieces):
        ids += piece
        if role == "gpt":
            masked = list(piece)
            for i in list(range(min(header, len(piece)))) + [len(piece) - 1]:
                masked[i] = IGNORE
            labels += masked
        else:
            labels += [IGNORE] * len(piece)
    return ids, labels


def mpt_prompt(system_template, user, assistant, sep, turns, system, counts, strip=False):
    prompt = system_template.format(system_message=system) + sep
    for turn in turns:
        value = turn.text.strip() if strip else turn.text
        prompt += (user if turn.role == "human" else assistant) + value + sep if value else (
            user if turn.role == "human" else assistant)
    prompt, _ = spelled_out(prompt, counts, 0)
    return prompt


def encode_whole(tokenizer, prompt):
    ids = tokenizer([prompt], return_tensors="pt", padding=False, max_length=tokenizer.model_max_length,
                    truncation=True).input_ids
    return ids, ids.clone()


def finish(tokenizer, ids, target, cursor):
    target[0, cursor:] = IGNORE
    if cursor != int(ids[0].ne(tokenizer.pad_token_id).sum()):
        target[:] = IGNORE  # upstream: "tokenization mismatch", the sample stays with no label
    return ids[0].tolist(), target[0].tolist()


def upstream_hermes2(tokenizer, turns, system, counts):
    prompt = mpt_prompt("<|im_start|>system\n{system_message}", "<|im_start|>user\n", "<|im_start|>assistant\n",
                        "<|im_end|>", turns, system, counts)
    ids, target = encode_whole(tokenizer, prompt)
    sep = "<|im_end|><|im_start|>assistant\n"
    parts = prompt.split("<|im_end|>")
    rounds = ["<|im_end|>".join(parts[:3])] + ["<|im_end|>".join(parts[k:k + 2]) for k in range(3, len(parts), 2)]
    cursor = 0
    for text in rounds:
        if not text:
            break
        length = len(tokenizer(text).input_ids) + 1
        halves = text.split(sep)
        if len(halves) != 2:
            break
        instruction = len(tokenizer(halves[0] + sep).input_ids)
        target[0, cursor:cursor + instruction] = IGNORE
        cursor += length
    return finish(tokenizer, ids, target, cursor)


def upstream_internlm2(tokenizer, turns, system, counts):
    user, assistant = "<|im_start|>user\n", "<|im_start|>assistant\n"
    prompt = mpt_prompt("<|im_start|>system\n{system_message}", user, assistant, "<|im_end|>", turns, system,
                        counts, strip=True)
    ids, target = encode_whole(tokenizer, prompt)
    target[0, :1] = IGNORE
    cursor = 1
    parts = prompt.split(assistant)
    n = len(tokenizer(parts[0] + assistant).input_ids) - 1
    target[0, cursor:cursor + n] = IGNORE
    cursor += n
    for middle in parts[1:-1]:
        answer, question = middle.split(user)
        cursor += len(tokenizer(answer).input_ids) - 1
        n = len(tokenizer(user + question + assistant).input_ids) - 1
        target[0, cursor:cursor + n] = IGNORE
        cursor += n
    cursor += len(tokenizer(parts[-1]).input_ids) - 1
    return finish(tokenizer, ids, target, cursor)


def upstream_phi3(tokenizer, turns, system, counts):
    prompt = mpt_prompt("<|system|>\n{system_message}", "<|user|>\n", "<|assistant|>\n", "<|end|>", turns, system,
                        counts)
    ids, target = encode_whole(tokenizer, prompt)
    target[0, :1] = IGNORE
    target[target == tokenizer.convert_tokens_to_ids("<|endoftext|>")] = IGNORE
    sep = "<|end|><|assistant|>\n"
    parts = prompt.split("<|end|>")
    rounds = ["<|end|>".join(parts[:3])] + ["<|end|>".join(parts[k:k + 2]) for k in range(3, len(parts), 2)]
    cursor = 1
    for index, text in enumerate(rounds):
        if not text:
            break
        length = len(tokenizer(text).input_ids) - (0 if index == 0 else 1)
        halves = text.split(sep)
        if len(halves) != 2:
            break
        instruction = len(tokenizer(halves[0] + sep).input_ids) - (1 if index == 0 else 2)
        target[0, cursor:cursor + instruction] = IGNORE
        cursor += length
    return finish(tokenizer, ids, target, cursor)


UPSTREAM = {"internvl2_5": upstream_internvl2_5, "Hermes-2": upstream_hermes2, "internlm2-chat": upstream_internlm2,
            "phi3-chat": upstream_phi3}

# (turns, image token counts): one image, two turns with an image each, two images in one turn, text only
CONVERSATIONS = [
    ((Turn("human", "<image>\nWhat is in this image?"), Turn("gpt", "A harbour with many boats.")), [8]),
    ((Turn("human", "<image>\nDescribe the scene."), Turn("gpt", "Farmland, forest and sea."),
      Turn("human", "And this one?\n<image>"), Turn("gpt", " Yes, it is. ")), [4, 12]),
    ((Turn("human", "<image>\n<image>\nCompare the two images."), Turn("gpt", "The first is greener."),
      Turn("human", "Which class is it?"), Turn("gpt", "water")), [8, 4]),
    ((Turn("human", "Which class is it?"), Turn("gpt", "water"), Turn("human", "Describe the scene."),
      Turn("gpt", "Farmland.")), []),
]
CASES = [("internvl2_5", "qwen_like"), ("internvl2_5", "internlm_like"), ("Hermes-2", "qwen_like"),
         ("internlm2-chat", "internlm_like"), ("phi3-chat", "phi3_like")]


@pytest.mark.parametrize("system", [None, "Be brief."])
@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("template, tokenizer_name", CASES)
def test_labels_equal_upstream_token_for_token(request, template, tokenizer_name, conversation, system):
    tokenizer = request.getfixturevalue(tokenizer_name)
    turns, counts = CONVERSATIONS[conversation]
    ours = ConversationTokenizer(tokenizer, template)(turns, system, counts)
    expected_ids, expected_labels = UPSTREAM[template](tokenizer, turns, system or DEFAULT_SYSTEM[template], counts)
    assert ours.input_ids == expected_ids
    assert ours.labels == expected_labels
    assert any(label != IGNORE for label in ours.labels)  # a real mask, not upstream's all-ignored fallback
    supervised = tokenizer.decode([t for t, label in zip(ours.input_ids, ours.labels) if label != IGNORE])
    assert turns[-1].text.strip() in supervised  # the last answer is learnt


@pytest.mark.parametrize("template", ["internlm2-chat", "phi3-chat"])
def test_counts_that_do_not_add_up_are_refused_where_upstream_trains_on_nothing(qwen_like, internlm_like, template):
    """internlm2-chat's counts assume a BOS tokenizer: with a Qwen2-like one upstream ignores every label."""
    turns, counts = CONVERSATIONS[1]
    if template == "phi3-chat":
        tokenizer = internlm_like  # BOS but no leading '▁': phi3's offsets do not fit
        tokenizer.add_tokens(["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], special_tokens=True)
    else:
        tokenizer = qwen_like
    _, labels = UPSTREAM[template](tokenizer, turns, "s", counts)
    assert all(label == IGNORE for label in labels)
    with pytest.raises(TemplateError, match="tokenization mismatch"):
        ConversationTokenizer(tokenizer, template)(turns, "s", counts)


def test_templates_lay_out_the_prompt_as_upstream(qwen_like, phi3_like):
    turns = (Turn("human", "<image>\nWhat?"), Turn("gpt", "Sea."))
    hermes = qwen_like.decode(ConversationTokenizer(qwen_like, "Hermes-2")(turns, "S", [2]).input_ids)
    assert hermes == ("<|im_start|>system\nS<|im_end|><|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat?"
                      "<|im_end|><|im_start|>assistant\nSea.<|im_end|>")
    phi3 = phi3_like.decode(ConversationTokenizer(phi3_like, "phi3-chat")(turns, "S", [1]).input_ids)
    assert phi3 == "<s>▁<|system|>\nS<|end|><|user|>\n<img><IMG_CONTEXT></img>\nWhat?<|end|><|assistant|>\nSea.<|end|>"


def test_classifier_target_of_a_choice_question(qwen_like):
    turns = (Turn("human", "<image>\n<cls>Which class is it? Options: water|forest|farmland. Answer with one."),
             Turn("gpt", "forest"))
    result = ConversationTokenizer(qwen_like, "internvl2_5")(turns, "s", [4], classify=True)
    first = lambda text: qwen_like(text, add_special_tokens=False).input_ids[0]  # noqa: E731
    target = result.classify
    assert target.choice_ids == tuple(sorted({first("water"), first("forest"), first("farmland")}))
    assert target.answer_id == first("forest") == result.input_ids[target.position]
    assert result.labels[target.position] == target.answer_id  # the answer's first (supervised) token
    plain = ConversationTokenizer(qwen_like, "internvl2_5")(CONVERSATIONS[0][0], "s", [8], classify=True)
    assert plain.classify is None  # no <cls> question: no choice loss
