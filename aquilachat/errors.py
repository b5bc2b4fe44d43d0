"""The exceptions aquilachat raises on bad input.

Every error a user can cause (a missing file, a malformed checkpoint, an invalid sampling
parameter) is one of these, with a message that names the file, key or field involved, so the
command line can print one readable line instead of a traceback.
"""

from __future__ import annotations


class AquilaChatError(Exception):
    """Base class of every error aquilachat raises on purpose."""


class ConfigError(AquilaChatError, ValueError):
    """A configuration (model ``config.json``, training YAML) is missing, malformed or unsupported."""


class CheckpointError(AquilaChatError, ValueError):
    """A checkpoint file is missing, truncated, or holds missing, unexpected or misshaped tensors."""


class TokenizerError(AquilaChatError, ValueError):
    """Tokenizer files are missing or inconsistent."""


class ValidationError(AquilaChatError, ValueError):
    """A request parameter (sampling, prompt length, message list) is out of range.

    ``ValidationError(field, message)`` names the offending field in :attr:`field` (the server
    reports it as the error's ``param``); ``ValidationError(message)`` where no one field is at
    fault. The message names the field either way.
    """

    def __init__(self, field_or_message: str, message: str | None = None) -> None:
        if message is None:
            field, message = None, field_or_message
        else:
            field = field_or_message
        super().__init__(message)
        #: The request field at fault (``"temperature"``, ``"stop"``, ``"prompt"``), or None.
        self.field: str | None = field


class DataError(AquilaChatError, ValueError):
    """A dataset row is malformed; the message names the file and line."""
