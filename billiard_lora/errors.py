"""One exception type for mistakes a user can fix, and the CLI wrapper that prints it as one line."""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input or environment; its message says what to do. Printed without traceback."""


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command-line ``main`` so a ``UserError`` becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are a ``UserError``: one line through ``cli_entry`` instead of a usage block."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{message} (see {self.prog} --help)")
