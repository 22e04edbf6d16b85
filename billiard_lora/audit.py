"""Check a training set before training: decode every image, list broken files, conversions, near-duplicates, sizes.

    python -m billiard_lora.audit DIR [--resolution 1024] [--json OUT] [--class billiards] [--splits train,valid,test]

DIR is anything ``resolve_source`` takes (a folder, a Kaggle-layout folder, ``kaggle:owner/name``, ``default``).
Exit code 0 when the set is trainable, 1 when it is not, 2 for a usage error.
"""

from __future__ import annotations

import json
import statistics
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from billiard_lora.data import KAGGLE_SPLITS, BadImageError, Example, ImageSource, open_image, resolve_source
from billiard_lora.errors import ArgumentParser, UserError, cli_entry

# 64-bit dHash distances on the team's 155 billiards photos (+24 other-sport photos): the known duplicate pair
# train/052 ~ train/083 (083 adds a watermark and caption bar) is at 8; the closest unrelated pair is at 14.
# 10 sits between with 2 bits of margin either side.
DEFAULT_HASH_THRESHOLD = 10
# dHash sees only structure: two flat or low-texture images of different colours hash alike. Pairs must also have
# mean colours within this many levels per channel (the known pair above differs by 12 because of the caption bar).
COLOR_TOLERANCE = 32
UPSCALE_WARN = 2.0  # beyond 2x the model mostly learns the blur of the upscale
CROP_LOSS_WARN = 0.2  # a square crop cutting off this much of a photo's longer side (4:5 and wider) is worth a note
SHOWN = 20  # summary lines per list before "... and N more"


@dataclass
class AuditedImage:
    """A good image: where it is, its size after conversion (w, h), its stored mode/format, what was converted."""

    path: Path | None
    size: tuple[int, int]
    mode: str
    format: str | None
    conversions: list[str]
    index: int  # position in the audited examples


@dataclass
class BadImage:
    """A file that cannot be trained on, and why."""

    path: Path | None
    reason: str
    index: int


@dataclass
class NearDuplicate:
    """Two images whose perceptual hashes differ in at most the threshold's number of bits."""

    a: Path | None
    b: Path | None
    distance: int
    mirrored: bool = False  # b is a left-right mirror of a
    index_a: int = -1  # positions in the audited examples (names in-memory images)
    index_b: int = -1


@dataclass
class AuditReport:
    """What ``audit`` found; ``summary()`` for people, ``to_dict()`` for JSON, ``raise_for_bad()`` for the trainer."""

    description: str
    root: Path | None
    resolution: int
    hash_threshold: int
    images: list[AuditedImage]
    bad: list[BadImage]
    near_duplicates: list[NearDuplicate]
    counts: dict[str, dict[str, int]]  # split -> class -> files (Kaggle layout only)
    warnings: list[str]
    examples: list[Example] = field(default_factory=list, repr=False)

    # -- statistics over the good images ----------------------------------------------------------------------------
    def _dims(self, i: int) -> list[int]:
        return [im.size[i] for im in self.images]

    @property
    def min_size(self) -> tuple[int, int] | None:
        """Smallest width and smallest height (each on its own)."""
        return (min(self._dims(0)), min(self._dims(1))) if self.images else None

    @property
    def median_size(self) -> tuple[int, int] | None:
        """Median width and median height."""
        return (int(statistics.median(self._dims(0))), int(statistics.median(self._dims(1)))) if self.images else None

    @property
    def max_size(self) -> tuple[int, int] | None:
        """Largest width and largest height."""
        return (max(self._dims(0)), max(self._dims(1))) if self.images else None

    @property
    def aspect_ratios(self) -> dict[str, int]:
        """How many images have each width/height ratio (rounded to 2 decimals), most common first."""
        return dict(Counter(f"{w / h:.2f}" for w, h in (im.size for im in self.images)).most_common())

    def _upscales(self) -> list[float]:
        return [self.resolution / min(im.size) for im in self.images]

    @property
    def upscale_factor_max(self) -> float | None:
        """resolution / shorter side, for the smallest image."""
        return max(self._upscales()) if self.images else None

    @property
    def upscale_factor_median(self) -> float | None:
        """resolution / shorter side, median over images."""
        return statistics.median(self._upscales()) if self.images else None

    @property
    def trainable(self) -> bool:
        """At least one good image and no bad ones."""
        return bool(self.images) and not self.bad

    # -- output -----------------------------------------------------------------------------------------------------
    def name(self, path: Path | None, index: int = -1) -> str:
        """A path as shown in reports: relative to the source root when possible."""
        if path is None:
            return f"image #{index}"
        if self.root is not None:
            try:
                return path.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return str(path)

    def summary(self) -> str:
        """A human-readable multi-line report."""
        n_all = len(self.images) + len(self.bad)
        lines = [f"Audit of {self.description}", f"  {n_all} files: {len(self.images)} good, {len(self.bad)} bad"]
        if self.counts:
            per = [f"{s}/{c} {n}" for s, classes in self.counts.items() for c, n in classes.items()]
            lines.append("  per split/class: " + ", ".join(per))
        if self.images:
            (w0, h0), (w1, h1), (w2, h2) = self.min_size, self.median_size, self.max_size
            ratios = ", ".join(f"{r} x{n}" for r, n in list(self.aspect_ratios.items())[:5])
            lines.append(f"  sizes (w x h): min {w0}x{h0}, median {w1}x{h1}, max {w2}x{h2}; aspect ratios {ratios}")
            lines.append(
                f"  upscale to {self.resolution} px: median {self.upscale_factor_median:.1f}x, "
                f"max {self.upscale_factor_max:.1f}x"
            )
        converted = [im for im in self.images if im.conversions]
        lines.append(f"  converted on load: {len(converted) or 'none'}")
        lines += _capped([f"    {self.name(im.path, im.index)}: {'; '.join(im.conversions)}" for im in converted])
        lines.append(
            f"  near-duplicates (dHash distance <= {self.hash_threshold}): {len(self.near_duplicates) or 'none'}"
        )
        lines += _capped([
            f"    {self.name(d.a, d.index_a)} ~ {self.name(d.b, d.index_b)} "
            f"(distance {d.distance}{', mirrored' if d.mirrored else ''})"
            for d in self.near_duplicates
        ])
        lines.append(f"  bad files: {len(self.bad) or 'none'}")
        lines += [f"    {self.name(b.path, b.index)}: {b.reason}" for b in self.bad]  # all of them, always
        if self.warnings:
            lines.append("  warnings:")
            lines += [f"    - {w}" for w in self.warnings]
        verdict = "trainable" if self.trainable else "NOT trainable"
        lines.append(f"  verdict: {verdict} ({len(self.images)} good image{'s' * (len(self.images) != 1)})")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-able values (paths as strings relative to the root)."""
        return {
            "description": self.description,
            "root": str(self.root) if self.root else None,
            "resolution": self.resolution,
            "trainable": self.trainable,
            "n_good": len(self.images),
            "n_bad": len(self.bad),
            "counts": self.counts,
            "min_size": self.min_size,
            "median_size": self.median_size,
            "max_size": self.max_size,
            "aspect_ratios": self.aspect_ratios,
            "upscale_factor_max": self.upscale_factor_max,
            "upscale_factor_median": self.upscale_factor_median,
            "hash_threshold": self.hash_threshold,
            "near_duplicates": [
                {
                    "a": self.name(d.a, d.index_a),
                    "b": self.name(d.b, d.index_b),
                    "distance": d.distance,
                    "mirrored": d.mirrored,
                }
                for d in self.near_duplicates
            ],
            "bad": [{"path": self.name(b.path, b.index), "reason": b.reason} for b in self.bad],
            "images": [
                {
                    "path": self.name(im.path, im.index),
                    "size": list(im.size),
                    "mode": im.mode,
                    "format": im.format,
                    "conversions": im.conversions,
                }
                for im in self.images
            ],
            "warnings": self.warnings,
        }

    def raise_for_bad(self, skip_bad: bool = False) -> list[Example]:
        """The good examples; one UserError listing every bad file unless ``skip_bad`` (then a warning)."""
        good = [self.examples[im.index] for im in self.images]
        if self.bad and not skip_bad:
            listing = "\n".join(f"  {self.name(b.path, b.index)}: {b.reason}" for b in self.bad)
            raise UserError(
                f"{len(self.bad)} of {len(self.bad) + len(good)} images in {self.root or self.description} "
                f"cannot be used:\n{listing}\n"
                f"Fix or delete them, or pass --skip_bad_images to train on the {len(good)} good ones."
            )
        if not good:
            raise UserError(f"no usable images in {self.root or self.description}")
        if self.bad:
            warnings.warn(f"skipping {len(self.bad)} bad image(s); training on the {len(good)} good ones")
        return good


def _capped(lines: list[str]) -> list[str]:
    if len(lines) <= SHOWN:
        return lines
    return lines[:SHOWN] + [f"    ... and {len(lines) - SHOWN} more (all of them in --json)"]


# ----------------------------------------------------------------------------------------------------------------------


def _as_examples(source_or_paths: ImageSource | str | Path | Iterable) -> tuple[list[Example], Path | None, str, str]:
    if isinstance(source_or_paths, ImageSource):
        s = source_or_paths
        return s.examples, s.root, s.description, s.kind
    if isinstance(source_or_paths, (str, Path)):
        return _as_examples(resolve_source(str(source_or_paths)))
    examples = []
    for item in source_or_paths:
        if isinstance(item, Example):
            examples.append(item)
        elif isinstance(item, Image.Image):
            examples.append(Example(None, None, item))
        else:
            examples.append(Example(Path(item), None))
    return examples, None, f"{len(examples)} images", "paths"


def _dhash64(img: Image.Image) -> int:
    import imagehash

    return int(str(imagehash.dhash(img)), 16)


def _mean_color(img: Image.Image) -> np.ndarray:
    return np.asarray(img.resize((16, 16), Image.Resampling.BOX), np.float32).mean(axis=(0, 1))


def _near_duplicates(
    hashes: np.ndarray, mirrored: np.ndarray, colors: np.ndarray, threshold: int
) -> list[tuple[int, int, int, bool]]:
    """(i, j, distance, mirrored) for every pair within ``threshold`` bits; vectorised per row, fine for 10k images."""
    pairs = []
    for i in range(len(hashes) - 1):
        direct = np.bitwise_count(hashes[i] ^ hashes[i + 1 :])
        flipped = np.bitwise_count(hashes[i] ^ mirrored[i + 1 :])
        best = np.minimum(direct, flipped)
        same_color = np.abs(colors[i + 1 :] - colors[i]).max(axis=1) <= COLOR_TOLERANCE
        for j in np.nonzero((best <= threshold) & same_color)[0]:
            pairs.append((i, i + 1 + int(j), int(best[j]), bool(flipped[j] < direct[j])))
    return sorted(pairs, key=lambda p: (p[2], p[0], p[1]))


def audit(
    source_or_paths: ImageSource | str | Path | Iterable,
    resolution: int = 1024,
    *,
    hash_threshold: int = DEFAULT_HASH_THRESHOLD,
) -> AuditReport:
    """Decode every image fully; report bad files, conversions, near-duplicates, sizes and upscale factors."""
    examples, root, description, kind = _as_examples(source_or_paths)
    good: list[AuditedImage] = []
    bad: list[BadImage] = []
    hashes, mirrored, colors = [], [], []
    for i, ex in enumerate(tqdm(examples, desc="audit", unit="img", disable=None)):
        try:
            img, info = open_image(ex.image if ex.image is not None else ex.path)
        except BadImageError as exc:
            bad.append(BadImage(ex.path, exc.reason, i))
            continue
        good.append(AuditedImage(ex.path, info["size"], info["mode"], info["format"], info["conversions"], i))
        hashes.append(_dhash64(img))
        mirrored.append(_dhash64(ImageOps.mirror(img)))
        colors.append(_mean_color(img))

    dups = _near_duplicates(
        np.array(hashes, dtype=np.uint64),
        np.array(mirrored, dtype=np.uint64),
        np.array(colors, dtype=np.float32).reshape(-1, 3),
        hash_threshold,
    )
    near = [NearDuplicate(good[i].path, good[j].path, d, m, good[i].index, good[j].index) for i, j, d, m in dups]

    counts: dict[str, dict[str, int]] = {}
    if kind == "kaggle" and root is not None:
        for ex in examples:
            split, cls = ex.path.relative_to(root).parts[:2]
            counts.setdefault(split, {}).setdefault(cls, 0)
            counts[split][cls] += 1
        order = {s: i for i, s in enumerate(KAGGLE_SPLITS)}  # train, valid, test; then others alphabetically
        counts = dict(sorted(counts.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))

    report = AuditReport(description, root, resolution, hash_threshold, good, bad, near, counts, [], examples)
    report.warnings = _warnings(report)
    return report


def _warnings(r: AuditReport) -> list[str]:
    out = []
    if r.images and r.upscale_factor_max > UPSCALE_WARN:
        sides = [min(im.size) for im in r.images]
        photos = (
            f"the photos are {sides[0]} px"
            if len(set(sides)) == 1
            else f"the smallest photo is {min(sides)} px (median {statistics.median(sides):g} px)"
        )
        advice = "consider --resolution 512 or higher-resolution photos" if r.resolution > 512 else (
            "consider higher-resolution photos"
        )
        out.append(
            f"{photos} and training is at {r.resolution} px: a {r.upscale_factor_max:.1f}x upscale; {advice}"
        )
    if r.images:  # a square crop of a 3:2 photo drops a third of it; buckets keep its shape
        lost = [1 - min(im.size) / max(im.size) for im in r.images]
        cut = [x for x in lost if x >= CROP_LOSS_WARN]
        if len(cut) * 4 >= len(lost):
            share = f"{min(cut):.0%}" if f"{min(cut):.0%}" == f"{max(cut):.0%}" else f"{min(cut):.0%} to {max(cut):.0%}"
            out.append(
                f"{len(cut)} of {len(lost)} photos lose {share} of their width or height to a square crop; "
                f"--use_aspect_ratio_buckets trains each at its own shape"
            )
    if r.near_duplicates:
        out.append(
            f"{len(r.near_duplicates)} near-duplicate pair(s) count twice in training; delete one of each if unintended"
        )
    if not r.images:
        out.append("no usable images")
    return out


# ----------------------------------------------------------------------------------------------------------------------


REPORT_MARKER = "billiard_lora_audit"  # the first key of a report audit --json wrote


def _is_audit_report(path: Path) -> bool:
    try:
        return json.loads(path.expanduser().read_text()).get(REPORT_MARKER) is True
    except (OSError, ValueError, AttributeError):
        return False


@cli_entry
def main(argv: list[str] | None = None) -> int:
    """Audit DIR and print the summary; 0 when trainable, 1 when not."""
    p = ArgumentParser(prog="python -m billiard_lora.audit", description=__doc__.splitlines()[0])
    p.add_argument("dir", metavar="DIR", help="folder, Kaggle-layout folder, kaggle:owner/name, or default")
    p.add_argument("--resolution", type=int, default=1024, help="training resolution, for the upscale check")
    p.add_argument("--json", metavar="OUT", help="also write the full report as JSON here")
    p.add_argument("--class", "--kaggle_class", dest="kaggle_class", default="billiards",
                   help="class folder in a Kaggle layout (train's --kaggle_class)")
    p.add_argument("--splits", "--kaggle_splits", dest="splits", default="train",
                   help="comma-separated Kaggle splits, e.g. train,valid,test (train's --kaggle_splits)")
    p.add_argument("--caption_column", default=None, help="caption column of metadata.jsonl/csv, if any")
    p.add_argument("--hash_threshold", type=int, default=DEFAULT_HASH_THRESHOLD, help="max dHash bits apart")
    p.add_argument("--overwrite", action="store_true", help="replace the --json file if it is there")
    args = p.parse_args(argv)
    if args.resolution <= 0:
        raise UserError(f"--resolution must be positive, got {args.resolution}")
    if args.json:  # checked before the audit: an earlier report may be replaced, any other file only if asked
        from .io import check_new_file

        check_new_file(args.json, "--json", overwrite=args.overwrite or _is_audit_report(Path(args.json)))

    source = resolve_source(
        args.dir,
        caption_column=args.caption_column,
        kaggle_class=args.kaggle_class,
        splits=[s.strip() for s in args.splits.split(",") if s.strip()],
    )
    report = audit(source, args.resolution, hash_threshold=args.hash_threshold)
    print(report.summary())
    if args.json:
        from .io import atomic_write_json

        atomic_write_json(Path(args.json).expanduser(), {REPORT_MARKER: True, **report.to_dict()})
        print(f"wrote {args.json}")
    return 0 if report.trainable else 1


if __name__ == "__main__":
    sys.exit(main())
