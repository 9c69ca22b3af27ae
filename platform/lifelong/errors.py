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


def first_line(error: BaseException | str, limit: int = 300) -> str:
    """The first line of an error's message, for one-line reports (the type's name if it has none).
    An error raised in a Ray task or actor is reported by its cause (Ray's first line names only
    the task and its process)."""
    cause = getattr(error, "cause", None)
    if isinstance(error, BaseException) and type(error).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {first_line(cause, limit)}"[:limit]
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]
