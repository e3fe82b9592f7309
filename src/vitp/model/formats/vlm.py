"""The whole vision-language model's key layouts, composed from the ViT's and the LLM's tables.

Our module: ``vision_model.<timm names>``, ``mlp1.{0,1,3}``, ``language_model.<the native causal LM's names>``.

* InternVL remote code (``internvit``): InternViT names under ``vision_model.``, ``mlp1.*``, the LLM
  family's stored names under ``language_model.`` (InternLM2's ``wqkv``... for InternVL2.5-2B).
* transformers InternVL (``hf``, as written on disk): ``vision_tower.<hf names>``,
  ``multi_modal_projector.*``, ``language_model.model.*``, ``language_model.lm_head.*``; older and hub
  files spell some prefixes differently (``model.vision_tower.``, ``lm_head.``), see :func:`canonical_hf_key`.
* an ``mlp1`` file (upstream's ``tools/extract_mlp.py`` writes ``mlp_projector.pth``): the projector's
  own state dict, ``0.weight`` ... ``3.bias``, with or without ``mlp1.``.
"""

from __future__ import annotations

from vitp.model.formats import vit
from vitp.model.formats.keymap import KeyMap, Rename
from vitp.model.formats.llm import NATIVE, LLMFamily

VISION_PREFIX = {"internvit": "vision_model.", "hf": "vision_tower."}

_PROJECTOR_REMOTE = KeyMap([Rename("mlp1.{i}.{kind}", "mlp1.{i}.{kind}")])
_PROJECTOR_HF = KeyMap([
    Rename("mlp1.0.{kind}", "multi_modal_projector.layer_norm.{kind}"),
    Rename("mlp1.1.{kind}", "multi_modal_projector.linear_1.{kind}"),
    Rename("mlp1.3.{kind}", "multi_modal_projector.linear_2.{kind}"),
])
# Spellings transformers accepts for the same tensors, rewritten to the on-disk form above.
_HF_ALIASES = (
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def canonical_hf_key(key: str) -> str:
    for alias, canonical in _HF_ALIASES:
        if key.startswith(alias):
            return canonical + key[len(alias) :]
    return key


def vlm_keymap(layout: str, llm: KeyMap | None = None) -> KeyMap:
    """Our VLM's names -> ``layout`` (``internvit`` = InternVL remote code, ``hf`` = transformers).
    ``llm`` is the LLM family's table (from :meth:`LLMFamily.keymap_for`); transformers' layout always
    stores the native names."""
    vision = vit.KEYMAPS[layout].prefixed("vision_model.", VISION_PREFIX[layout])
    projector = _PROJECTOR_REMOTE if layout == "internvit" else _PROJECTOR_HF
    language = (llm if layout == "internvit" and llm is not None else NATIVE.keymap).prefixed(
        "language_model.", "language_model."
    )
    return vision + projector + language


def projector_keymap(stored_keys: list[str]) -> KeyMap:
    """An ``mlp1`` file's table: the projector's keys with or without the ``mlp1.`` prefix."""
    prefix = "mlp1." if any(key.startswith("mlp1.") for key in stored_keys) else ""
    return KeyMap([Rename("mlp1.{i}.{kind}", prefix + "{i}.{kind}")])


def llm_keymap(family: LLMFamily, text_config: dict) -> KeyMap:
    """A causal LM directory's table (its own names, no prefix) for our ``language_model.``."""
    return family.keymap_for(text_config).prefixed("language_model.", "")
