"""Exceptions with messages meant for people: what was expected, what was found, where, and the fix."""


class AccessoryError(Exception):
    """Base class of every error this package raises on purpose."""


class CheckpointError(AccessoryError, ValueError):
    """A checkpoint directory or file is missing, malformed, or does not fit the model."""


class ConfigError(AccessoryError, ValueError):
    """Model arguments (config.json / llama_config / meta.json) are missing or invalid."""


class TokenizerError(AccessoryError, ValueError):
    """A tokenizer could not be found or loaded, or does not fit the model."""
