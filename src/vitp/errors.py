"""User-facing errors.

Anything a user can cause with their own input (a wrong checkpoint, a bad flag) raises a subclass of
:class:`VitpError` with a message that says what was found and what was expected. The command line
prints that message and exits non-zero instead of showing a traceback.
"""


class VitpError(Exception):
    """Base class of the errors the command line reports as one clean message."""


class WeightFormatError(VitpError):
    """A checkpoint could not be read, was not recognised, or does not fit the model."""


class ConfigError(VitpError):
    """A model configuration is invalid or describes a network vitp does not implement."""
