"""Training and evaluation: the Lightning data module and training module, checkpoints, the teacher side (live or
cached), config checks and the run entry points (``pand.engine.run``). Importing the package imports none of them, so
that the command line can check settings before torch is loaded."""
