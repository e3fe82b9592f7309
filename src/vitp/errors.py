"""User-facing errors: the one rule.

A mistake in a value the caller passed raises a plain ``ValueError``/``TypeError`` naming the
parameter. Anything a user can cause with their own files or settings (a wrong checkpoint, a corrupt
JSONL line, an index that does not fit its features) raises one of the few classes below, with a
message that says what was found, where, and what to do. The command line prints that message and
exits non-zero; the server turns a :class:`ServeError` into its HTTP status and any other
:class:`VitpError` into a 500 with the message.
"""


class VitpError(Exception):
    """Base class of the errors the command line reports as one clean message."""


class ConfigError(VitpError):
    """Settings or a model configuration that cannot work: an unknown architecture, values that
    contradict each other, an output that would overwrite something, a device that is not there."""


class DataError(VitpError):
    """Training or evaluation data (meta JSON, annotation lines, images, tokenizer corpora) that
    cannot be used; messages name the file (and line)."""


class WeightFormatError(VitpError):
    """A checkpoint could not be read, was not recognised, or does not fit the model."""


class RetrievalError(VitpError):
    """Features, an index, a search or an evaluation that cannot be built, read or run as asked."""


class ServeError(VitpError):
    """A request the server cannot answer as asked; ``status_code`` is the HTTP status that says why
    (400 unless given: 404 not in the gallery, 413 too large, 415 unsupported format)."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(message)
        self.status_code = status_code
