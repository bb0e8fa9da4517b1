"""Exceptions pand raises for bad input.

Every error names the offending file, value or setting and, where it helps, what was expected, so that a user can fix
the input without reading pand's source.
"""

from __future__ import annotations


class PandError(Exception):
    """Base class for every error pand raises on purpose."""


class DatasetNotFoundError(PandError, FileNotFoundError):
    """A dataset file or folder is missing; the message names it and the expected layout."""


class CorruptImageError(PandError):
    """An image file exists but cannot be decoded; the message names its path."""


class ConfigError(PandError, ValueError):
    """A configuration value is invalid or disagrees with the data (e.g. a class count)."""


class MismatchError(PandError):
    """A stored artefact (cache, prompt file, checkpoint) was made with another teacher, class list or data."""


class WeightsUnavailableError(PandError):
    """Pretrained weights could not be obtained (offline, missing file); the message says how to supply them."""


class CheckpointError(PandError):
    """A checkpoint file cannot be read as a pand checkpoint (missing, empty, truncated, or carrying code)."""


class OutputError(PandError):
    """An output folder cannot be written (read-only, not a folder, disk full)."""


class TrainingDivergedError(PandError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the terms."""


def closest(word: str, options) -> str | None:
    """The option closest to a mistyped ``word``, or None if none is close."""
    import difflib

    options = [str(o) for o in options]
    same_letters = [o for o in options if o.lower() == str(word).lower()]  # a wrong case is the likeliest typo
    if same_letters:
        return same_letters[0]
    close = difflib.get_close_matches(str(word), options, n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(word: str, options) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options`` to a mistyped ``word``, or an empty string."""
    match = closest(word, options)
    return f" (did you mean {match!r}?)" if match else ""
