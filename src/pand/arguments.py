"""The argument parser of the commands whose options argparse reads (sweep, gather, tsne, quickstart, bench, teacher
fit): argparse's, except that a usage error is a :class:`~pand.errors.ConfigError`, so that it prints as the one
``pand COMMAND: error: ...`` line (exit status 2) of every other command instead of a usage block above the error."""

from __future__ import annotations

import argparse
from typing import NoReturn

from pand.errors import ConfigError


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse names an unrecognised argument as typed, line breaks included: keep the message on one line
        raise ConfigError(f"{message} ({self.prog} --help)".replace("\n", "\\n"))
