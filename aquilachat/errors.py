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
    """A request parameter (sampling, prompt length, message list) is out of range."""


class DataError(AquilaChatError, ValueError):
    """A dataset row is malformed; the message names the file and line."""
