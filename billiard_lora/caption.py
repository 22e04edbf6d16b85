"""Caption training photos with BLIP: a ``.txt`` beside each image, which training then reads as its caption.

    python -m billiard_lora.caption DIR [--prefix "a photo of TOK, "] [--model Salesforce/blip-image-captioning-large]

DIR is a folder of photos, a Kaggle-layout folder (``--kaggle_class``/``--kaggle_splits`` pick the photos, as in
training) or a kohya-style one. Photos that already have a ``.txt`` keep it unless ``--overwrite``; unreadable
photos are listed and skipped. diffusers' advanced DreamBooth docs caption the same way (BLIP large) before
training with ``--caption_column``; with sidecar files no column is needed: training reads them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import METADATA_FILES, BadImageError, load_image, resolve_source
from .errors import ArgumentParser, UserError, check_device, cli_entry
from .io import atomic_write_text
from .models import BLIP_CAPTIONER, load_captioner
from .paths import DEFAULT_DATA_DIR


@dataclass
class CaptionReport:
    written: list[Path] = field(default_factory=list)  # the .txt files written
    kept: list[Path] = field(default_factory=list)  # photos whose .txt was already there
    bad: list[tuple[Path, str]] = field(default_factory=list)  # unreadable photos and why

    def summary(self) -> str:
        parts = [f"captioned {len(self.written)} photo(s)"]
        if self.kept:
            parts.append(f"{len(self.kept)} kept their .txt (--overwrite replaces them)")
        if self.bad:
            parts.append(f"{len(self.bad)} unreadable, skipped: " + "; ".join(f"{p.name} ({why})"
                                                                              for p, why in self.bad[:3]))
        return ", ".join(parts)


def caption_photos(folder: str | Path, *, model: str = BLIP_CAPTIONER, prefix: str = "", suffix: str = "",
                   overwrite: bool = False, kaggle_class: str = "billiards", kaggle_splits: str = "train",
                   batch_size: int = 8, max_new_tokens: int = 30, device: str | None = None,
                   captioner=None) -> CaptionReport:
    """Write ``prefix + BLIP's caption + suffix`` to a ``.txt`` beside each photo training would take from
    ``folder``. ``captioner``: an already loaded ``(model, processor)``."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"{folder}: no such folder; caption a local folder of photos")
    if root.resolve() == DEFAULT_DATA_DIR.resolve():
        raise UserError(f"{root} is the embedded default data; caption a folder of your own photos")
    table = next((root / m for m in METADATA_FILES if (root / m).is_file()), None)
    if table is not None:
        raise UserError(f"{table} holds this folder's captions (training reads them with --caption_column, and then "
                        f"no .txt file): add a column to it instead, or caption a folder without it")
    if batch_size < 1 or max_new_tokens < 1:
        raise UserError("--batch_size and --max_new_tokens must be at least 1")
    source = resolve_source(None, str(root), kaggle_class=kaggle_class, splits=kaggle_splits)
    report = CaptionReport()
    todo = []
    for example in source.examples:
        txt = example.path.with_suffix(".txt")
        if txt.is_file() and not overwrite:
            report.kept.append(example.path)
        else:
            todo.append(example.path)
    if not todo:
        return report
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    net, processor = captioner or load_captioner(model, device=device, torch_dtype=dtype)
    from tqdm.auto import tqdm

    with tqdm(total=len(todo), desc="captions", unit="photo", disable=len(todo) < 2) as bar:
        for start in range(0, len(todo), batch_size):
            batch, images = [], []
            for path in todo[start:start + batch_size]:
                try:
                    images.append(load_image(path))
                    batch.append(path)
                except BadImageError as exc:
                    report.bad.append((path, exc.reason))
            if images:
                inputs = processor(images=images, return_tensors="pt").to(net.device, net.dtype)
                with torch.no_grad():
                    out = net.generate(**inputs, max_new_tokens=max_new_tokens)
                for path, text in zip(batch, processor.batch_decode(out, skip_special_tokens=True)):
                    atomic_write_text(path.with_suffix(".txt"), f"{prefix}{text.strip()}{suffix}\n")
                    report.written.append(path.with_suffix(".txt"))
            bar.update(len(todo[start:start + batch_size]))
    return report


@cli_entry
def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m billiard_lora.caption", description=__doc__.splitlines()[0])
    p.add_argument("folder", metavar="DIR", help="a folder of photos (plain, Kaggle layout, or kohya-style)")
    p.add_argument("--model", default=BLIP_CAPTIONER, help=f"a BLIP captioning model (default {BLIP_CAPTIONER})")
    p.add_argument("--prefix", default="", help="text before each caption, e.g. 'a photo of TOK, '")
    p.add_argument("--suffix", default="", help="text after each caption")
    p.add_argument("--overwrite", action="store_true", help="replace .txt files that are already there")
    p.add_argument("--kaggle_class", default="billiards", help="in a Kaggle-layout folder: the class to caption")
    p.add_argument("--kaggle_splits", default="train", help="in a Kaggle-layout folder: the splits to caption")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=30)
    p.add_argument("--device", help="cuda, cpu, ... (default: cuda if available)")
    args = p.parse_args(argv)
    check_device(args.device)
    report = caption_photos(args.folder, model=args.model, prefix=args.prefix, suffix=args.suffix,
                            overwrite=args.overwrite, kaggle_class=args.kaggle_class, kaggle_splits=args.kaggle_splits,
                            batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, device=args.device)
    for path in report.written[:5]:
        print(f"{path}: {path.read_text().strip()}")
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
