"""Crash-safe file writing: every file appears complete or not at all (temp name in the same folder, fsync, rename)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600, and writers that replace the file (safetensors does) keep that: a normal file follows
        # the umask, so the LoRA can be read by whoever can read the run's other files
        normal_mode(tmp_path)
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def normal_mode(path: str | Path) -> None:
    """Give a file made by ``mkstemp`` (0600) or a folder made by ``mkdtemp`` (0700) the mode ``open``/``mkdir``
    would have: the umask's, so that others who can read the run's files can read this one too."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None,
                     precision: str | None = None) -> None:
    """``safetensors.torch.save_file`` made atomic; ``precision`` (fp32, fp16, bf16): the floating-point tensors
    saved in that precision (see ``in_precision``), else as they are."""
    from safetensors.torch import save_file

    if precision is not None:
        tensors = in_precision(tensors, precision, path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


# a weight file's precision by its usual names (kohya's --save_precision says "float" for fp32)
PRECISIONS = ("fp32", "fp16", "bf16", "float")


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def in_precision(tensors: dict, precision: str, name: str | Path) -> dict:
    """The floating-point tensors of ``tensors`` cast to ``precision`` (fp32, fp16, bf16), to be saved as ``name``.

    fp16 ends at ±65504: where a finite value lies beyond, casting would write infinities, so all the tensors stay
    as they are, with a warning. Values below a half float's smallest (6e-8) are written as 0 (kohya's issue #93):
    a warning counts them."""
    import warnings

    import torch

    dtype = torch_dtype(precision)
    floats = {k: v for k, v in tensors.items() if v.is_floating_point() and v.dtype != dtype}
    cast = {k: v.to(dtype) for k, v in floats.items()}
    overflow = [k for k in floats if bool((torch.isinf(cast[k]) & torch.isfinite(floats[k])).any())]
    if overflow:
        top = max(float(floats[k].abs().nan_to_num(0, 0, 0).max()) for k in overflow)
        kept = sorted({str(v.dtype).removeprefix("torch.") for v in floats.values()})
        warnings.warn(f"{name}: values up to {top:.3g} ({overflow[0]}) lie beyond {precision}'s range (±"
                      f"{torch.finfo(dtype).max:g}): saved in {'/'.join(kept)} instead (bf16 keeps fp32's range)")
        return dict(tensors)
    lost = sum(int(((cast[k] == 0) & (floats[k] != 0)).sum()) for k in floats)
    if lost:
        total = sum(int((v != 0).sum()) for v in floats.values())
        warnings.warn(f"{name}: {lost} of {total} non-zero values are below {precision}'s smallest "
                      f"({torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps:.1e}) and are saved as 0 "
                      f"(bf16 or fp32 keeps them)")
    return {**tensors, **cast}


def recast_safetensors(path: str | Path, precision: str) -> Path:
    """Rewrite a .safetensors file (header kept) with its floating-point tensors in ``precision``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_safetensors(tensors, path, metadata=header, precision=precision)
    return Path(path)


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place with one rename (replacing an older one of the same name)."""
    normal_mode(tmp_dir)
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)


# ============================================================================ where a command may write
def nearest_existing(p: Path) -> Path:
    """``p``, or the nearest of its parents that exists: where a new folder would be created, the place to ask."""
    return p if p.exists() else next((q for q in p.parents if q.exists()), Path("."))


def check_out_folder(path: str | Path, flag: str) -> Path:
    """A folder a command will write into: one line naming ``flag`` for a file in the way or a place it cannot
    write, before any work is done (not a traceback after it)."""
    from .errors import UserError

    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file; pass a folder")
    probe = nearest_existing(p)
    if not probe.is_dir():
        raise UserError(f"{flag} {p}: {probe} is a file, not a folder; choose another place")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {p}: {probe} is not writable; choose a folder you can write to")
    return p


def check_new_file(path: str | Path, flag: str, *, overwrite: bool = False) -> Path:
    """A file a command will write: not a folder, in a place it can write, and not an existing file unless
    ``overwrite`` (the command's --overwrite): nothing already written is replaced without being asked."""
    from .errors import UserError

    p = Path(path).expanduser()
    if p.is_dir():
        raise UserError(f"{flag} {p} is a folder; pass a file name")
    if p.exists() and not overwrite:
        raise UserError(f"{flag} {p} already exists; pass --overwrite to replace it, or choose another name")
    check_out_folder(p.parent, flag)
    return p
