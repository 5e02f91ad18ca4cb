"""Errors a user can act on: each message names what was wrong and how to fix it."""


class TrimError(Exception):
    """Base class for every error trim raises on purpose."""


class ConfigError(TrimError, ValueError):
    """A recipe key, type or value is invalid (raised before any work starts)."""


class DataError(TrimError):
    """A data source is missing, empty or unreadable as a whole."""


class CheckpointError(TrimError):
    """A checkpoint directory is missing a file or does not match the code."""
