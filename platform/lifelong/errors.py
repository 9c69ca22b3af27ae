"""Errors meant for people: each says what went wrong, where, and what to do.

The CLI prints these without a stack trace; anything else that escapes is a bug.
"""


class LifelongError(Exception):
    """Base class for errors a user can fix."""


class ConfigError(LifelongError):
    """A config file, key or override is wrong."""


class DataError(LifelongError):
    """Input data is unusable (nothing valid remains, no files match, ...)."""


class RegistryError(LifelongError):
    """A model reference does not resolve, or a registry operation is refused."""


class AliasConflict(RegistryError):
    """Another writer moved an alias between our read and our move."""
