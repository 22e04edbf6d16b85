"""One exception type for mistakes a user can fix, and the CLI wrapper that prints it as one line."""

from __future__ import annotations

import argparse
import functools
import re
import sys
import warnings
from pathlib import Path
from typing import Callable

import torch

# torch >= 2.5 names it torch.OutOfMemoryError (any device); before, only CUDA's existed
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


class UserError(Exception):
    """A problem with the user's input or environment; its message says what to do. Printed without traceback."""


def cli_entry(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command-line ``main`` so a ``UserError`` becomes one line on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        shown = warnings.showwarning
        warnings.showwarning = show_warning_plainly
        try:
            return main(*args, **kwargs) or 0
        except UserError as exc:
            _close_progress_bars()
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            _close_progress_bars()
            print(f"interrupted; {exc}" if str(exc) else "interrupted", file=sys.stderr)
            return 130
        except BrokenPipeError:  # the reader went away (`... | head`): nothing more to say, to anyone
            _quiet_stdout()
            return 141
        finally:
            warnings.showwarning = shown

    return wrapper


_PACKAGE_DIR = str(Path(__file__).resolve().parent)
# Library warnings about nothing a user of ours can or should change, left out of a command's output
HARMLESS_LIBRARY_WARNINGS = (
    "local_dir_use_symlinks",  # huggingface_hub: diffusers itself still passes the deprecated argument
    "will assume that the vocabulary was not modified",  # peft: SDXL's tokenizers are never resized here
)


def show_warning_plainly(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as a command prints it: ``warning: <text>``, without Python's file:line and source-line echo.

    Our own warnings are addressed to the user (they name the file or flag), so the text is all; a library's keeps
    its category and package, so that a deprecation can still be told from a problem with the run."""
    text = str(message).strip()
    ours = str(Path(filename).resolve()).startswith(_PACKAGE_DIR)
    if not ours and any(noise in text for noise in HARMLESS_LIBRARY_WARNINGS):
        return
    if not ours:
        parts = Path(filename).parts
        origin = next((parts[i + 1] for i in range(len(parts) - 1) if parts[i] == "site-packages"), Path(filename).name)
        text = f"{text} [{category.__name__} from {origin}]"
    stream = sys.stderr if file is None else file
    std = sys.modules.get("tqdm.std")
    try:
        if std is not None and getattr(std.tqdm, "_instances", None):  # above a running progress bar, not inside it
            std.tqdm.write(f"warning: {text}", file=stream)
        else:
            stream.write(f"warning: {text}\n")
    except (OSError, ValueError):  # stderr gone: a warning is not worth a second error
        pass


def _quiet_stdout() -> None:
    """After a broken pipe, point stdout at /dev/null so Python's exit flush does not print a second traceback."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # stdout already closed or not a real file: nothing left to flush
        pass


def _close_progress_bars() -> None:
    """End any progress bar left open by the error (its line), so that the error starts a line of its own."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", ())):
        try:
            bar.close()
        except Exception:  # a bar that cannot close only costs the line break
            pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are a ``UserError``: one line through ``cli_entry`` instead of a usage block."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise UserError(f"{message} (see {self.prog} --help)")


def out_of_memory_detail(exc: BaseException) -> str:
    """The useful part of torch's out-of-memory message, e.g. "20.00 MiB more was asked of a 14.75 GiB GPU"."""
    text = str(exc)
    asked = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
    total = re.search(r"total capacity of ([\d.]+ [KMGT]?i?B)", text)
    if asked and total:
        return f"{asked[1]} more was asked of a {total[1]} GPU"
    if asked:
        return f"{asked[1]} more was asked"
    return ""


def check_device(device: str | None, flag: str = "--device") -> str | None:
    """A device flag's value checked before any model loads: a name torch knows, and a GPU that is there."""
    if device is None:
        return None
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UserError(f"{flag} {device!r} is not a device: use cuda, cuda:N, cpu or mps") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise UserError(f"{flag} {device}: {why}; leave {flag} out to use what is here")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag} {device}: no Apple GPU (MPS) here; leave {flag} out to use what is here")
    return device
