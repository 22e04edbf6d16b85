"""Validation prompts from a file: kohya's ``--sample_prompts`` (a .txt, one prompt per line, with its inline
options) and SimpleTuner's ``--user_prompt_library`` (a .json of named prompts), so a prompt list kept for those
trainers works here unchanged.

.txt: blank lines and ``#`` lines skipped; after a prompt, kohya's ``--n NEGATIVE`` (negative prompt), ``--l 7.5``
(guidance scale) and ``--s 30`` (steps) set that row's images; ``--w``, ``--h`` (size), ``--d`` (seed) and any other
option are left out with a note: a validation grid's images share ``--resolution`` and the seeds seed, seed+1, ...
.json: ``{"name": "prompt", ...}`` (SimpleTuner), a list of prompts, or a list of ``{"prompt": ..., "negative_prompt":
..., "scale": ..., "sample_steps": ...}`` (kohya's .json form).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError


@dataclass(frozen=True)
class SamplePrompt:
    """One row of the validation grid; None: the run's --validation_negative_prompt / _guidance_scale /
    _inference_steps."""

    prompt: str
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    steps: int | None = None


_IGNORED = {"w": "width", "h": "height", "d": "seed", "ss": "sampler"}


def read_sample_prompts(path: str | Path) -> tuple[list[SamplePrompt], list[str]]:
    """(the rows, notes on what was left out); UserError naming the file (and line) where it cannot be read. Parsed
    once per version of the file (the config asks at each validation)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"--sample_prompts {path} does not exist: give a .txt file (one prompt per line) or a .json "
                        f"prompt library")
    stat = p.stat()
    rows, notes = _read(str(path), str(p), stat.st_mtime_ns, stat.st_size)
    return list(rows), list(notes)


@functools.lru_cache(maxsize=8)
def _read(path: str, resolved: str, mtime_ns: int, size: int) -> tuple[tuple[SamplePrompt, ...], tuple[str, ...]]:
    p, what = Path(resolved), f"--sample_prompts {path}"
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} cannot be read as UTF-8 text ({type(exc).__name__})") from None
    rows, notes = (_from_json(text, what) if p.suffix.lower() == ".json" else _from_txt(text, what))
    if not rows:
        raise UserError(f"{what} holds no prompt")
    return tuple(rows), tuple(notes)


def _from_txt(text: str, what: str) -> tuple[list[SamplePrompt], list[str]]:
    rows, left_out = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        prompt, *options = re.split(r"\s+--(?=[a-z]+\b)", " " + line, flags=re.IGNORECASE)
        values: dict = {}
        for option in options:
            name, _, value = option.partition(" ")
            name, value = name.lower(), value.strip()
            try:
                if name == "n":
                    values["negative_prompt"] = value
                elif name == "l":
                    values["guidance_scale"] = float(value)
                elif name == "s":
                    values["steps"] = int(value)
                    if values["steps"] < 1:
                        raise ValueError
                else:
                    left_out.add(f"--{name} ({_IGNORED.get(name, 'unknown to this trainer')})")
            except ValueError:
                raise UserError(f"{what}, line {number}: --{name} {value!r} is not a "
                                f"{'number' if name == 'l' else 'whole number of steps'}") from None
        if not prompt.strip():
            raise UserError(f"{what}, line {number}: options without a prompt before them")
        rows.append(SamplePrompt(prompt.strip(), **values))
    notes = [f"{what}: left out {', '.join(sorted(left_out))}: a validation grid's images share --resolution and "
             f"the seeds --seed, --seed+1, ..."] if left_out else []
    return rows, notes


def _from_json(text: str, what: str) -> tuple[list[SamplePrompt], list[str]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{what} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    items = list(data.values()) if isinstance(data, dict) else data if isinstance(data, list) else None
    if items is None:
        raise UserError(f"{what}: expected a JSON object of named prompts or a list of prompts")
    rows = []
    for i, item in enumerate(items):
        if isinstance(item, str) and item.strip():
            rows.append(SamplePrompt(item.strip()))
        elif isinstance(item, dict) and str(item.get("prompt", "")).strip():
            scale = item.get("scale", item.get("guidance_scale"))
            steps = item.get("sample_steps", item.get("steps"))
            try:
                rows.append(SamplePrompt(str(item["prompt"]).strip(), item.get("negative_prompt"),
                                         None if scale is None else float(scale), None if steps is None else int(steps)))
            except (TypeError, ValueError):
                raise UserError(f"{what}: entry {i + 1} has a scale or steps that is not a number") from None
        else:
            raise UserError(f"{what}: entry {i + 1} is neither a prompt nor an object with a \"prompt\"")
    return rows, []
