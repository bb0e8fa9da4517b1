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


class PrecisionError(PandError):
    """A low-precision (bf16 / fp16) teacher pass does not agree with fp32 within the tolerance, or gave NaN / inf;
    the message names the pass, the measured error and the tolerance."""


class WeightsUnavailableError(PandError):
    """Pretrained weights could not be obtained (offline, missing file); the message says how to supply them."""


class CheckpointError(PandError):
    """A checkpoint file cannot be read as a pand checkpoint (missing, empty, truncated, or carrying code)."""


class OutputError(PandError):
    """An output folder cannot be written (read-only, not a folder, disk full)."""


class TrainingDivergedError(PandError, FloatingPointError):
    """The training loss became NaN or infinite; the message names the step and the terms."""


class FolderInUseError(PandError):
    """Another live process owns a run or cache folder (its lock is held); the message names that process."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM stopped a command. ``saved`` says what was kept (a checkpoint, finished cache chunks) and
    ``resume`` how to continue (``None``: run the same command again).

    A BaseException like KeyboardInterrupt, so that no ``except Exception`` on the way up swallows it, but not a
    KeyboardInterrupt: Lightning turns that into ``sys.exit(1)``, and the CLI must exit with 128 + the signal number.
    """

    def __init__(self, signum: int, saved: str | None = None, resume: str | None = None,
                 checkpoint: str | None = None) -> None:
        self.signum, self.saved, self.resume, self.checkpoint = int(signum), saved, resume, checkpoint
        super().__init__(signum, saved)

    def with_saved(self, saved: str, *, checkpoint: str | None = None, resume: str | None = None) -> "Interrupted":
        """The same interruption, now knowing what the interrupted work had saved."""
        return Interrupted(self.signum, saved, resume if resume is not None else self.resume,
                           checkpoint if checkpoint is not None else self.checkpoint)


def close_matches(word: str, candidates, *, cutoff: float = 0.6, spread: float = 0.1, limit: int = 3) -> list[str]:
    """The candidates most similar to a mistyped ``word``: one that differs only in case first (the likeliest typo),
    then by difflib's ratio the best one and those nearly as good."""
    import difflib

    candidates = [str(c) for c in dict.fromkeys(candidates) if str(c) != word]
    same_letters = [c for c in candidates if c.lower() == str(word).lower()]
    if same_letters:
        return same_letters[:limit]
    scored = sorted((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates)
    scored = sorted(((r, c) for r, c in scored if r >= cutoff), key=lambda rc: (-rc[0], rc[1]))
    if not scored:
        return []
    return [c for r, c in scored if r >= scored[0][0] - spread][:limit]


def suggest(word: str, options) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options`` to a mistyped ``word``, or an empty string."""
    match = close_matches(word, options, limit=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def did_you_mean(suggestions: list[str] | tuple[str, ...]) -> str:
    """``"; did you mean a?"`` / ``"; did you mean a or b?"`` / ``""``."""
    if not suggestions:
        return ""
    return "; did you mean " + " or ".join(suggestions) + "?"
