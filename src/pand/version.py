"""pand's version, in a module of its own so that the lower layers (the provenance of what a run writes) can read it
without importing the package's ``__init__``, which reaches up to :mod:`pand.deploy` for ``pand.load_student``."""

__version__ = "0.1.0"
