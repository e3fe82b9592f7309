"""Moved to :mod:`vitp.data.templates` (all of InternVL's chat templates); these names stay importable
for the modules that still import them from here (model/checkpoint.py, data/tokenizer.py)."""

from vitp.data.templates import (  # noqa: F401
    CHATML_TOKENS,
    DEFAULT_SYSTEM_MESSAGE,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    INTERNVL_TOKENS,
    prepare_tokenizer,
)
