"""pand: distil vision-language teachers into lightweight students."""

from pand.version import __version__

__all__ = ["__version__", "load_student"]


def __getattr__(name: str):
    # Lazy, so that ``import pand`` (and the CLI's help) does not import torch.
    if name == "load_student":
        from pand.deploy import load_student

        return load_student
    raise AttributeError(f"module 'pand' has no attribute {name!r}")
