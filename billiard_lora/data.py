"""Image sources behind one interface (folder, Kaggle layout, Kaggle download, Hub, default) and pure image prep.

Every source becomes an ``ImageSource``: a list of ``Example`` (a file path or an in-memory image, plus an optional
caption). ``load_image`` turns any file into the RGB picture the trainer sees; ``prepare_image`` does the resize /
flip / crop of diffusers' SDXL DreamBooth script and returns the size-conditioning numbers SDXL needs.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import shutil
import warnings
from struct import error as struct_error  # broken image headers raise it
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from billiard_lora import paths
from billiard_lora.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Folders that hold copies or tool litter, never training images.
IGNORED_DIRS = {".ipynb_checkpoints", "__MACOSX", "__pycache__"}
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
KAGGLE_SPLITS = ("train", "valid", "test")
DEFAULT_KAGGLE_DATASET = "gpiosenka/sports-classification"
# Pillow's own default (about 89 MP; a 12000x7000 camera photo fits). We refuse anything larger ourselves instead of
# trusting the global Image.MAX_IMAGE_PIXELS, which another library may have raised or disabled.
MAX_PIXELS = 89_478_485


@dataclass
class Example:
    """One training image: a file, or an in-memory image (Hub datasets), and its caption."""

    path: Path | None  # file on disk (None for hub datasets, where `image` is set)
    caption: str | None  # per-image caption; None -> the trainer uses --instance_prompt
    image: Image.Image | None = None
    repeats: int = 1  # how often an epoch shows it (kohya's "N_name" folders), before --repeats


@dataclass
class ImageSource:
    """The examples one source yields, where they live, and a one-line description for logs and reports."""

    examples: list[Example]
    root: Path | None
    description: str
    columns: list[str] = field(default_factory=list)  # caption-table columns found, [] if no table
    kind: str = "folder"  # "folder", "kaggle" (train|valid|test/<class>/ layout) or "hub"

    def __len__(self) -> int:
        return len(self.examples)


# ----------------------------------------------------------------------------------------------------------------------
# Resolving a source


def resolve_source(
    dataset_name: str | None = None,
    instance_data_dir: str | None = None,
    *,
    image_column: str = "image",
    caption_column: str | None = None,
    kaggle_class: str = "billiards",
    splits: Sequence[str] = ("train",),
    cache_dir: str | Path | None = None,
) -> ImageSource:
    """Turn a --dataset_name / --instance_data_dir pair into an ImageSource (folder, Kaggle, Hub, or the default)."""
    if isinstance(splits, str):
        splits = [s for s in splits.split(",") if s]
    splits = tuple(splits)
    folder_kw = dict(caption_column=caption_column, kaggle_class=kaggle_class, splits=splits)

    name = dataset_name.strip() if dataset_name else None
    if name == "default":
        if instance_data_dir:
            raise UserError(f"pass either --dataset_name default or --instance_data_dir ({instance_data_dir}), not both")
        name = None
    if instance_data_dir:
        if name:
            raise UserError(
                f"pass either --dataset_name ({dataset_name}) or --instance_data_dir ({instance_data_dir}), not both"
            )
        folder = Path(instance_data_dir).expanduser()
        if not folder.is_dir():
            what = "a file; pass the folder that holds the images" if folder.exists() else "no such folder"
            raise UserError(f"--instance_data_dir {instance_data_dir}: {what}")
        return _folder_source(folder, **folder_kw)
    if name is None:
        if not paths.DEFAULT_DATA_DIR.is_dir():
            raise UserError(
                f"the embedded default data {paths.DEFAULT_DATA_DIR} is missing; "
                "recreate it with: python -m billiard_lora.synthetic"
            )
        source = _folder_source(paths.DEFAULT_DATA_DIR, **folder_kw)
        source.description = "embedded default (synthetic billiard scenes): " + source.description
        return source
    if name == "kaggle" or name.startswith("kaggle:"):
        dataset = name.partition(":")[2].strip() or DEFAULT_KAGGLE_DATASET
        return _kaggle_source(dataset, cache_dir=cache_dir, **folder_kw)

    local = Path(name).expanduser()
    if local.is_dir():
        return _folder_source(local, **folder_kw)
    if local.exists():
        raise UserError(f"{name} is a file; pass the folder that holds the images")
    # "owner/name" looks like a relative path too; only things that are clearly paths get a "no such folder" error.
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        raise UserError(f"{name}: no such folder")
    return _hub_source(name, image_column=image_column, caption_column=caption_column, cache_dir=cache_dir)


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in IGNORED_DIRS


def _is_image_name(name: str) -> bool:
    return _visible(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def list_images(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursive, sorted), skipping hidden files/dirs and .ipynb_checkpoints."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if _visible(d))  # prune in place: os.walk honours it
        found += [Path(dirpath) / f for f in filenames if _is_image_name(f)]
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def _subdirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and _visible(p.name))


def is_kaggle_layout(folder: Path) -> bool:
    """True for ``train|valid|test/<class>/`` folders (with or without sports.csv), as Kaggle's sports dataset ships."""
    return (folder / "sports.csv").is_file() or any(_subdirs(folder / s) for s in KAGGLE_SPLITS)


# kohya's DreamBooth folders: "<repeats>_<class or instance words>", e.g. "10_sks billiard"
_KOHYA_DIR = re.compile(r"^(\d+)_(.+)$")


def is_kohya_layout(folder: Path) -> bool:
    """True for a folder of kohya-style subfolders (``10_sks billiard/``, ...) and no images of its own."""
    subdirs = _subdirs(folder)
    return bool(subdirs) and all(_KOHYA_DIR.match(d) for d in subdirs) and not any(
        _is_image_name(p.name) for p in folder.iterdir() if p.is_file())


def _kohya_layout_source(folder: Path) -> ImageSource:
    """kohya's layout: each ``N_words`` subfolder's images, shown N times an epoch, captioned by their ``.txt`` (or
    ``.caption``) file where there is one, else by the folder's words, as kohya's DreamBooth datasets are."""
    examples: list[Example] = []
    parts = []
    for name in _subdirs(folder):
        repeats, words = _KOHYA_DIR.match(name).groups()
        if int(repeats) < 1:
            raise UserError(f"{folder / name}: kohya's folder names start with the repeats, at least 1 (e.g. "
                            f"10_{words}); rename it")
        files = list_images(folder / name)
        for p in files:
            side = next((p.with_suffix(ext) for ext in (".txt", ".caption") if p.with_suffix(ext).is_file()), None)
            caption = _clean_caption(side.read_text(encoding="utf-8")) if side else None
            examples.append(Example(p, caption or words.strip(), repeats=int(repeats)))
        parts.append(f"{name}: {len(files)}")
    if not examples:
        raise UserError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) found in the kohya-style subfolders of {folder}")
    shown = sum(e.repeats for e in examples)
    return ImageSource(examples, folder, f"kohya-style folder {folder} ({', '.join(parts)}; {shown} views an epoch "
                                         f"with the folders' repeats)", [], "kohya")


def _folder_source(
    folder: Path, *, caption_column: str | None, kaggle_class: str, splits: Sequence[str]
) -> ImageSource:
    if is_kaggle_layout(folder):
        return _kaggle_layout_source(folder, kaggle_class=kaggle_class, splits=splits, caption_column=caption_column)
    if is_kohya_layout(folder):
        return _kohya_layout_source(folder)
    files = list_images(folder)
    if not files:
        raise UserError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) found in {folder}")
    examples, columns, how = _captioned(folder, files, caption_column)
    return ImageSource(examples, folder, f"image folder {folder} ({len(files)} images, {how})", columns, "folder")


def _kaggle_layout_source(
    root: Path, *, kaggle_class: str, splits: Sequence[str], caption_column: str | None
) -> ImageSource:
    """Select one class and some splits from a Kaggle-layout folder; sports.csv lists the files when present."""
    csv_path = root / "sports.csv"
    rows = _read_kaggle_csv(csv_path) if csv_path.is_file() else None
    if rows is not None:
        available_splits = sorted({r["data set"] for r in rows})
        classes = sorted({r["labels"] for r in rows})
        listed_by = "listed by sports.csv"
    else:
        available_splits = [s for s in KAGGLE_SPLITS if (root / s).is_dir()]
        available_splits += [s for s in splits if s not in available_splits and _subdirs(root / s)]
        classes = sorted({c for s in available_splits for c in _subdirs(root / s)})
        listed_by = "found by walking the folders"

    missing = [s for s in splits if s not in available_splits]
    if missing or not splits:
        raise UserError(
            f"split {', '.join(missing) or '(none)'} not found in {root}; available: {', '.join(available_splits)}"
        )
    wanted = kaggle_class.strip().lower()
    if wanted not in {c.lower() for c in classes}:
        raise UserError(f"--kaggle_class={kaggle_class!r} is not a class in {root}; {_class_hint(wanted, classes)}")

    if rows is not None:
        files, gone = [], []
        for r in rows:
            if r["labels"].lower() == wanted and r["data set"] in splits:
                p = root / r["filepaths"]
                (files if p.is_file() else gone).append(p)
        if gone:
            # Not an error: deleting a broken file is what the audit tells people to do.
            warnings.warn(f"{len(gone)} file(s) listed in {csv_path} do not exist and are skipped, e.g. {gone[0]}")
    else:
        files = []
        for s in splits:
            for c in _subdirs(root / s):
                if c.lower() == wanted:
                    files += list_images(root / s / c)
    if not files:
        raise UserError(f"no images of class {kaggle_class!r} in splits {', '.join(splits)} of {root}")
    # Same order with or without the CSV: splits as requested, then path.
    order = {s: i for i, s in enumerate(splits)}
    files.sort(key=lambda p: (order.get(p.relative_to(root).parts[0], len(order)), p.relative_to(root).as_posix()))
    examples, columns, how = _captioned(root, files, caption_column)
    desc = (
        f"Kaggle layout folder {root}, class {kaggle_class}, splits {','.join(splits)} "
        f"({len(files)} images {listed_by}, {how})"
    )
    return ImageSource(examples, root, desc, columns, "kaggle")


def _class_hint(wanted: str, classes: Sequence[str]) -> str:
    """'did you mean ...?' for a misspelt class, else the classes (the first 12 of Kaggle's 100, with a count)."""
    import difflib

    by_lower = {c.lower(): c for c in classes}
    close = difflib.get_close_matches(wanted, list(by_lower), n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(by_lower[c]) for c in close) + "?"
    shown = ", ".join(classes[:12]) + (f" ... ({len(classes)} classes in all)" if len(classes) > 12 else "")
    return f"classes: {shown or 'none'}"


def kaggle_class_counts(root: str | Path) -> dict[str, dict[str, int]]:
    """Images per class and split of a Kaggle-layout folder ({class: {split: n}}), from sports.csv or the folders."""
    root = Path(root)
    counts: dict[str, dict[str, int]] = {}
    rows = _read_kaggle_csv(root / "sports.csv") if (root / "sports.csv").is_file() else None
    if rows is not None:
        for r in rows:
            per = counts.setdefault(r["labels"], {})
            per[r["data set"]] = per.get(r["data set"], 0) + 1
    else:
        for split in KAGGLE_SPLITS:
            for c in _subdirs(root / split) if (root / split).is_dir() else []:
                counts.setdefault(c, {})[split] = len(list_images(root / split / c))
    if not counts:
        raise UserError(f"{root} is not in the Kaggle layout (train|valid|test/<class>/ folders or sports.csv)")
    return counts


def _read_kaggle_csv(csv_path: Path) -> list[dict[str, str]] | None:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fieldnames = [c.strip() for c in reader.fieldnames or []]
        if not {"filepaths", "labels", "data set"} <= set(fieldnames):
            warnings.warn(f"{csv_path} lacks the columns filepaths, labels, data set; walking the folders instead")
            return None
        rows = []
        for raw in reader:
            r = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
            r["filepaths"] = r["filepaths"].replace("\\", "/")  # CSVs written on Windows
            rows.append(r)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Captions


def _read_metadata(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows and column names of a metadata.jsonl / metadata.csv (Hugging Face imagefolder convention)."""
    rows: list[dict[str, Any]] = []
    columns: list[str] = []
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path} line {n} is not valid JSON: {exc.msg}") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path} line {n} is not a JSON object")
                rows.append(row)
                columns += [k for k in row if k not in columns]
    else:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    return rows, columns


def _clean_caption(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _captioned(
    root: Path, files: list[Path], caption_column: str | None
) -> tuple[list[Example], list[str], str]:
    """Pair each file with its caption: metadata table column, else sidecar .txt, else None (instance prompt)."""
    table = next((root / m for m in METADATA_FILES if (root / m).is_file()), None)
    if table is not None:
        rows, columns = _read_metadata(table)
        if "file_name" not in columns:
            raise UserError(f"{table} has no file_name column; columns: {', '.join(columns) or '(none)'}")
        if caption_column is None:
            how = f"instance prompt: no --caption_column, so {table.name} is not used"
            return [Example(p, None) for p in files], columns, how
        if caption_column not in columns:
            raise UserError(
                f"--caption_column {caption_column!r} is not a column of {table}; columns: {', '.join(columns)}"
            )
        by_name = {str(r.get("file_name", "")).replace("\\", "/").removeprefix("./"): r for r in rows}
        examples, unlisted = [], 0
        for p in files:
            row = by_name.pop(p.relative_to(root).as_posix(), None)
            unlisted += row is None
            examples.append(Example(p, _clean_caption(row.get(caption_column)) if row else None))
        if unlisted:
            warnings.warn(f"{unlisted} image(s) have no row in {table}; they use the instance prompt")
        if by_name:
            warnings.warn(f"{len(by_name)} row(s) of {table} name no image file, e.g. {next(iter(by_name))}")
        return examples, columns, f"captions from {table.name} column {caption_column!r}"

    examples = []
    for p in files:
        txt = p.with_suffix(".txt")
        examples.append(Example(p, _clean_caption(txt.read_text(encoding="utf-8")) if txt.is_file() else None))
    n = sum(e.caption is not None for e in examples)
    if n:
        return examples, [], f"{n} captions from .txt files"
    if caption_column is not None:
        # The seed command passes --caption_column=prompt to a plain photo folder; that must still train.
        msg = (
            f"--caption_column {caption_column!r} given but {root} has no metadata.jsonl/metadata.csv and no .txt "
            "captions: every image uses the instance prompt"
        )
        warnings.warn(msg)
    return examples, [], "no captions: instance prompt"


# ----------------------------------------------------------------------------------------------------------------------
# Kaggle download


def _kaggle_credentials_source() -> str | None:
    """Where Kaggle credentials would come from, or None. Never returns the secret itself."""
    env = os.environ
    if env.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
        return "KAGGLE_USERNAME/KAGGLE_KEY"
    if env.get("KAGGLE_KERNEL_RUN_TYPE"):
        return "Kaggle notebook"
    home = Path.home()
    dirs = [Path(env["KAGGLE_CONFIG_DIR"])] if env.get("KAGGLE_CONFIG_DIR") else []
    dirs += [home / ".kaggle", Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "kaggle"]
    for d in dirs:
        for name in ("kaggle.json", "access_token", "access_token.txt", "credentials.json"):
            if (d / name).is_file():
                return str(d / name)
    return None


def _kaggle_credentials_help(dataset: str) -> str:
    return (
        f"no Kaggle credentials found, so kaggle:{dataset} cannot be downloaded. Create an API token at "
        "https://www.kaggle.com/settings (API > Create New Token), then either:\n"
        "  - export KAGGLE_USERNAME=<your user name> and KAGGLE_KEY=<your key> (or KAGGLE_API_TOKEN=<token>), or\n"
        "  - save the downloaded kaggle.json as ~/.kaggle/kaggle.json and run: chmod 600 ~/.kaggle/kaggle.json, or\n"
        "  - on Colab: add KAGGLE_USERNAME and KAGGLE_KEY as secrets (key icon) and run\n"
        "      import os; from google.colab import userdata\n"
        "      os.environ['KAGGLE_USERNAME'] = userdata.get('KAGGLE_USERNAME'); "
        "os.environ['KAGGLE_KEY'] = userdata.get('KAGGLE_KEY')\n"
        "    or upload kaggle.json to ~/.kaggle/ (chmod 600).\n"
        "Or train without downloading: --dataset_name default, or a local folder."
    )


def _kaggle_download(dataset: str, dest_dir: Path) -> None:
    """The only network call: download ``owner/name`` from Kaggle as a zip into ``dest_dir``."""
    try:
        # Imported here: importing kaggle tries to authenticate and creates ~/.kaggle.
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as exc:
        # kaggle 2.2.5 imports `six` without declaring it; name whatever is missing.
        missing = f" {exc.name}" if getattr(exc, "name", None) and exc.name != "kaggle" else ""
        raise UserError(f"the kaggle package cannot be imported ({exc}); run: pip install kaggle{missing}") from None
    api = KaggleApi()
    try:
        api.authenticate()  # calls exit(1) when it finds no credentials
    except SystemExit:
        raise UserError(_kaggle_credentials_help(dataset)) from None
    try:
        api.dataset_download_files(dataset, path=str(dest_dir), quiet=False, unzip=False)
    except Exception as exc:  # HTTP 401/403/404, network: say what to check, without the library's traceback
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"downloading kaggle:{dataset} failed ({first_line}); check the name on kaggle.com, your credentials "
            "and the network, or pass --dataset_name default"
        ) from None


def find_kaggle_root(folder: Path, max_depth: int = 4) -> Path | None:
    """The shallowest folder under ``folder`` in the Kaggle layout (zips often wrap it in extra folders)."""
    level = [folder]
    for _ in range(max_depth + 1):
        for d in level:
            if is_kaggle_layout(d):
                return d
        level = [d / s for d in level for s in _subdirs(d)]
    return None


def download_kaggle_dataset(dataset: str, cache_dir: str | Path | None = None) -> Path:
    """Download and unzip ``owner/name`` once into the cache; return the unpacked folder."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", dataset):
        raise UserError(f"kaggle:{dataset} is not of the form kaggle:<owner>/<dataset>")
    base = Path(cache_dir) if cache_dir else paths.cache_dir() / "kaggle"
    dest = base / dataset
    if (dest / ".complete").is_file():
        return dest
    if _kaggle_credentials_source() is None:
        raise UserError(_kaggle_credentials_help(dataset))
    # Download and unpack next to the final place, then rename: an interrupted run never looks finished.
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    print(f"downloading kaggle:{dataset} into {dest} (once)")
    try:
        _kaggle_download(dataset, partial)
        for z in sorted(partial.glob("*.zip")):
            try:
                with zipfile.ZipFile(z) as zf:
                    zf.extractall(partial)  # extractall drops absolute paths and ".." components
            except zipfile.BadZipFile:
                raise UserError(f"the download of kaggle:{dataset} is not a valid zip; retry") from None
            z.unlink()
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    (partial / ".complete").write_text(dataset + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    partial.rename(dest)
    return dest


def _kaggle_source(
    dataset: str, *, cache_dir: str | Path | None, caption_column: str | None, kaggle_class: str, splits: Sequence[str]
) -> ImageSource:
    folder = download_kaggle_dataset(dataset, cache_dir)
    root = find_kaggle_root(folder)
    if root is None:
        raise UserError(f"kaggle:{dataset} unpacked into {folder} but holds no train|valid|test/<class>/ folders")
    source = _kaggle_layout_source(root, kaggle_class=kaggle_class, splits=splits, caption_column=caption_column)
    source.description = f"kaggle:{dataset} -> {source.description}"
    return source


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face Hub datasets


def _hub_source(
    name: str, *, image_column: str, caption_column: str | None, cache_dir: str | Path | None
) -> ImageSource:
    hint = "pass a local folder, kaggle:<owner>/<dataset>, or default"
    try:
        import datasets  # optional and heavy: only Hub datasets need it
    except ImportError:
        raise UserError(f"{name!r} is not a folder, and Hub datasets need the 'datasets' package; {hint}") from None
    try:
        ds = datasets.load_dataset(name, cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as exc:  # offline, no such repo, gated...
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load Hugging Face dataset {name!r} ({first_line}); {hint}") from None
    if hasattr(ds, "keys"):  # a DatasetDict: DreamBooth uses the train split, like diffusers
        if "train" not in ds:
            raise UserError(f"Hugging Face dataset {name!r} has no train split; splits: {', '.join(ds.keys())}")
        ds = ds["train"]
    columns = list(ds.column_names)
    if image_column not in columns:
        raise UserError(f"--image_column {image_column!r} is not a column of {name}; columns: {', '.join(columns)}")
    if caption_column is not None and caption_column not in columns:
        raise UserError(f"--caption_column {caption_column!r} is not a column of {name}; columns: {', '.join(columns)}")
    examples = [
        Example(None, _clean_caption(row[caption_column]) if caption_column else None, row[image_column])
        for row in ds
    ]
    how = f"captions from column {caption_column!r}" if caption_column else "instance prompt"
    desc = f"Hugging Face dataset {name}, split train ({len(examples)} images, {how})"
    return ImageSource(examples, None, desc, columns, "hub")


# ----------------------------------------------------------------------------------------------------------------------
# Loading one image


class BadImageError(UserError):
    """A file that cannot be used as a training image; ``reason`` says why without the path."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.reason = reason


def _to_8bit_rgb(img: Image.Image) -> Image.Image:
    """Grayscale with more than 8 bits (I;16*, I, F) -> RGB, scaling the range instead of clipping it at 255."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0  # 65535 -> 255
    elif img.mode == "I":
        # 32-bit ints usually hold 16-bit data (older Pillow opens 16-bit PNGs as "I"); 8-bit data stays as it is.
        arr = np.clip(arr, 0, 65535) / 257.0 if arr.max(initial=0) > 255 else arr
    else:  # "F": no standard range; [0, 1] floats are the common case
        top = arr.max(initial=0)
        arr = arr * 255.0 if top <= 1.0 else (arr if top <= 255 else arr / top * 255.0)
    gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")


def _on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def open_image(path_or_image: str | Path | Image.Image) -> tuple[Image.Image, dict[str, Any]]:
    """Fully decode and convert to RGB like ``load_image``; also return facts (size, mode, format, conversions)."""
    if isinstance(path_or_image, Image.Image):
        return _convert(path_or_image, "in-memory image")
    path = Path(path_or_image)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(str(path), "empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its limit; a bomb is a bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
                if w * h > MAX_PIXELS:
                    raise BadImageError(
                        str(path), f"decompression bomb: {w}x{h} = {w * h:,} pixels is over the {MAX_PIXELS:,} limit"
                    )
                return _convert(img, str(path))
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(str(path), "file not found") from None
    except PermissionError:
        raise BadImageError(str(path), "unreadable: permission denied") from None
    except IsADirectoryError:
        raise BadImageError(str(path), "is a folder, not an image") from None
    except UnidentifiedImageError:
        raise BadImageError(str(path), "not an image (Pillow cannot identify the file)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        detail = str(exc).split(", could be")[0]  # "Image size (N pixels) exceeds limit of M pixels"
        raise BadImageError(str(path), f"decompression bomb: {detail[:1].lower() + detail[1:]}") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct_error) as exc:
        # Truncated data ("image file is truncated"), broken chunks, bad headers.
        msg = str(exc).strip() or type(exc).__name__
        if "truncated" in msg.lower() or isinstance(exc, EOFError):
            msg = f"truncated or corrupt ({msg})"
        raise BadImageError(str(path), f"cannot decode: {msg}") from None


def _convert(img: Image.Image, name: str) -> tuple[Image.Image, dict[str, Any]]:
    """Decode ``img`` fully and make it plain RGB, recording every conversion that changed something."""
    conversions: list[str] = []
    fmt = img.format
    mode = img.mode
    n_frames = getattr(img, "n_frames", 1)
    if getattr(img, "is_animated", False) and n_frames > 1:
        img.seek(0)
        conversions.append(f"animated ({n_frames} frames): first frame used")
    img.load()  # full decode here, so truncated files fail now rather than in the middle of training
    if img.width == 0 or img.height == 0:
        raise BadImageError(name, f"zero-sized image ({img.width}x{img.height})")

    orientation = img.getexif().get(0x0112, 1)  # EXIF Orientation
    if orientation not in (1, None):
        img = ImageOps.exif_transpose(img)
        conversions.append(f"EXIF orientation {orientation}: rotated/flipped upright")

    if mode == "RGB":
        out = img.convert("RGB")  # a copy: detaches from the file, drops animation state
    elif mode.startswith("I;16") or mode in ("I", "F"):
        out = _to_8bit_rgb(img)
        conversions.append(f"{'16-bit' if mode != 'F' else 'float'} grayscale ({mode}) scaled to 8-bit RGB")
    elif mode in ("L", "1"):
        out = img.convert("RGB")
        conversions.append(f"grayscale ({mode}) -> RGB")
    elif mode == "P":
        if "transparency" in img.info:
            out = _on_white(img)
            conversions.append("palette with transparency -> RGB on white")
        else:
            out = img.convert("RGB")
            conversions.append("palette (P) -> RGB")
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        out = _on_white(img)
        conversions.append(f"alpha ({mode}) composited on white")
    elif mode == "CMYK":
        out = img.convert("RGB")
        conversions.append("CMYK -> RGB")
    else:  # YCbCr, LAB, HSV, ...
        out = img.convert("RGB")
        conversions.append(f"{mode} -> RGB")
    info = {"size": out.size, "mode": mode, "format": fmt, "conversions": conversions}
    return out, info


def load_image(path_or_image: str | Path | Image.Image) -> Image.Image:
    """Any image file (or PIL image) as upright 8-bit RGB; a broken file raises UserError naming it."""
    return open_image(path_or_image)[0]


def load_example(example: Example) -> Image.Image:
    """The RGB image of an Example, whether it lives on disk or in memory."""
    return load_image(example.image if example.image is not None else example.path)


# ----------------------------------------------------------------------------------------------------------------------
# Training-time prep (pure)

INTERPOLATIONS = {
    "lanczos": Image.Resampling.LANCZOS,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "nearest_exact": Image.Resampling.NEAREST,  # PIL's nearest already picks the exact centre pixel
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """(w, h) with the shorter side = resolution, the longer truncated like torchvision's Resize(int)."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


# ---- aspect-ratio buckets: each image trained at the size of its own shape instead of cropped to a square
BUCKET_STEP = 64  # bucket sides are multiples of this (kohya's and SDXL's own buckets; the model may ask for more)
MAX_BUCKET_RATIO = 4.0  # SDXL's training buckets run from 512x2048 to 2048x512


def auto_buckets(resolution: int, step: int = BUCKET_STEP, max_ratio: float = MAX_BUCKET_RATIO) -> list[tuple[int, int]]:
    """SDXL-style buckets for ``resolution``: the square ``resolution`` first, then (h, w) with sides multiples of
    ``step`` (at most the resolution), the largest area not above resolution^2 for each width, aspect ratios up to
    ``max_ratio`` either way. At 1024 px these are SDXL's own (1024x1024, 896x1152, 832x1216, 768x1344, 640x1536,
    512x2048 and their transposes among them)."""
    area = resolution * resolution
    step = min(step, resolution)
    wide = {(h, w) for w in range(step, int(resolution * max_ratio ** 0.5) + 1, step)
            if (h := area // w // step * step) >= step and max(w / h, h / w) <= max_ratio}
    buckets = wide | {(w, h) for h, w in wide}  # portrait and landscape alike
    square = (resolution, resolution)  # exactly: square photos train as they would without buckets
    return [square] + sorted((b for b in buckets if b[0] != b[1]), key=lambda b: b[1] / b[0])


def parse_buckets(text: str, resolution: int, flag: str = "--aspect_ratio_buckets") -> list[tuple[int, int]]:
    """``"auto"`` (``auto_buckets(resolution)``) or ``"h1,w1;h2,w2;..."`` (diffusers' form) as a list of (h, w)."""
    if text.strip().lower() == "auto":
        return auto_buckets(resolution)
    buckets = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            h, w = (int(v) for v in part.split(","))
        except ValueError:
            raise UserError(f"{flag}={text!r}: write each bucket as height,width in pixels, separated by ';' "
                            f"(e.g. '1024,1024;896,1152;1152,896'), or 'auto'") from None
        if h <= 0 or w <= 0 or h % 8 or w % 8:
            raise UserError(f"{flag}: bucket {h},{w} must have positive sides that are multiples of 8 (SDXL's VAE "
                            f"downsamples by 8)")
        if (h, w) not in buckets:
            buckets.append((h, w))
    if not buckets:
        raise UserError(f"{flag}={text!r} names no bucket: give 'height,width;...' or 'auto'")
    return buckets


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The (h, w) bucket whose aspect ratio is closest to the image's (in log ratio, so 2:1 and 1:2 are as far
    from 1:1); the first listed on a tie."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def cover_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of the image scaled to just cover the (h, w) ``target``; for a square target the same as
    ``resized_size`` (the shorter side = the target, the longer truncated)."""
    th, tw = target
    if tw * height >= th * width:  # the width is the tight side
        return tw, max(th, int(tw * height / width))
    return max(tw, int(th * width / height)), th


def plan_crop(
    width: int, height: int, resolution: int, *, center_crop: bool, crop_rng: random.Random | None = None,
    target: tuple[int, int] | None = None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where a view comes from, without touching pixels: ((w, h) after the resize, crop top-left (top, left)).

    ``target``: the (h, w) of the view (an aspect-ratio bucket); by default the square ``resolution``."""
    th, tw = target or (resolution, resolution)
    w, h = cover_size(width, height, (th, tw))
    if center_crop:
        # Same rounding as torchvision's CenterCrop and diffusers' y1/x1.
        return (w, h), (int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)))
    if crop_rng is None:
        raise ValueError("a random crop needs crop_rng (a seeded random.Random) so it can be reproduced")
    top = crop_rng.randint(0, h - th)
    return (w, h), (top, crop_rng.randint(0, w - tw))


def render_view(image: Image.Image, resolution: int, size: tuple[int, int], crop: tuple[int, int], *, flip: bool,
                interpolation: str = "lanczos", target: tuple[int, int] | None = None) -> torch.Tensor:
    """The pixels of a planned view: resize to ``size``, flip, crop at ``crop``; (3, h, w) in [-1, 1], the (h, w)
    of ``target`` (by default the square ``resolution``)."""
    resample = INTERPOLATIONS.get(interpolation.lower())
    if resample is None:
        raise UserError(f"unknown interpolation {interpolation!r}; choose from {', '.join(INTERPOLATIONS)}")
    if image.mode != "RGB":
        image = load_image(image)
    if size != image.size:  # torchvision skips an identity resize too
        image = image.resize(size, resample=resample)
    if flip:
        image = ImageOps.mirror(image)
    top, left = crop
    th, tw = target or (resolution, resolution)
    image = image.crop((left, top, left + tw, top + th))
    arr = np.asarray(image, dtype=np.uint8)  # (h, w, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div(127.5).sub(1.0)


# ----------------------------------------------------------------------------------------------------------------------
# Loss masks (--masked_loss): white trains, black is ignored

ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def alpha_mask(path_or_image: str | Path | Image.Image) -> Image.Image | None:
    """The image's alpha channel as an upright "L" mask (kohya's --alpha_mask), or None if it has none."""
    def from_image(img: Image.Image) -> Image.Image | None:
        if img.mode not in ALPHA_MODES and not (img.mode == "P" and "transparency" in img.info):
            return None
        return ImageOps.exif_transpose(img).convert("RGBA").getchannel("A")

    if isinstance(path_or_image, Image.Image):
        return from_image(path_or_image)
    with Image.open(path_or_image) as img:  # the image itself was decoded (and checked) already
        return from_image(img)


def find_mask_file(image_path: Path, root: Path | None, mask_dir: Path) -> Path | None:
    """The mask of ``image_path`` in ``mask_dir``: a file with the image's name (any image extension) at the image's
    path relative to the dataset's root, or at the top of ``mask_dir``."""
    rel_parent = image_path.parent.relative_to(root) if root is not None and image_path.is_relative_to(root) else None
    for folder in ([mask_dir / rel_parent] if rel_parent not in (None, Path(".")) else []) + [mask_dir]:
        for ext in IMAGE_EXTENSIONS:
            for name in (image_path.stem + ext, image_path.stem + ext.upper()):
                if (folder / name).is_file():
                    return folder / name
    return None


def load_mask(path: Path, image_size: tuple[int, int]) -> Image.Image:
    """A mask file as an "L" image of ``image_size`` (w, h): any format ``load_image`` reads, scaled when it was made
    at another resolution of the same shape; another shape is a one-line error naming both."""
    mask = load_image(path).convert("L")
    if mask.size != image_size:
        (mw, mh), (w, h) = mask.size, image_size
        if abs(mw / mh - w / h) > 0.01 * (w / h):
            raise UserError(f"{path}: mask is {mw}x{mh} but its image is {w}x{h}; make the mask the image's shape "
                            f"(white where the loss counts)")
        mask = mask.resize(image_size, resample=Image.Resampling.BILINEAR)
    return mask


def render_mask(mask: Image.Image, size: tuple[int, int], crop: tuple[int, int], *, flip: bool,
                target: tuple[int, int], latent_factor: int = 8) -> torch.Tensor:
    """A view of the mask, resized, flipped and cropped as ``render_view`` does the image, then averaged down to
    the latents' (h/8, w/8) (kohya's "area" interpolation): (1, h/8, w/8) in [0, 1]."""
    if size != mask.size:
        mask = mask.resize(size, resample=Image.Resampling.BILINEAR)
    if flip:
        mask = ImageOps.mirror(mask)
    (top, left), (th, tw) = crop, target
    arr = np.asarray(mask.crop((left, top, left + tw, top + th)), dtype=np.float32) / 255.0
    full = torch.from_numpy(arr.copy())[None, None]
    return torch.nn.functional.interpolate(full, size=(th // latent_factor, tw // latent_factor), mode="area")[0]


def prepare_image(
    image: Image.Image,
    resolution: int,
    *,
    center_crop: bool,
    flip: bool,
    crop_rng: random.Random | None = None,
    interpolation: str = "lanczos",
) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
    """Resize, flip, crop to a square: (pixels (3, R, R) in [-1, 1], original (h, w), crop top-left (top, left)).

    The crop is planned in the flipped image (same size as the unflipped one), as diffusers' script does.
    """
    if interpolation.lower() not in INTERPOLATIONS:
        raise UserError(f"unknown interpolation {interpolation!r}; choose from {', '.join(INTERPOLATIONS)}")
    if image.mode != "RGB":
        image = load_image(image)
    original_size = (image.height, image.width)  # SDXL's add_time_ids want (h, w)
    size, crop = plan_crop(image.width, image.height, resolution, center_crop=center_crop, crop_rng=crop_rng)
    pixels = render_view(image, resolution, size, crop, flip=flip, interpolation=interpolation)
    return pixels, original_size, crop


def collate(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Stack ``pixel_values`` (and any other tensors) into a batch; other keys become lists."""
    items = list(items)
    if not items:
        raise ValueError("collate got an empty batch")
    batch: dict[str, Any] = {}
    for key in items[0]:
        values = [it[key] for it in items]
        batch[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    if "pixel_values" in batch:
        # contiguous float32, as diffusers' collate_fn hands it to the VAE.
        batch["pixel_values"] = batch["pixel_values"].to(memory_format=torch.contiguous_format).float()
    return batch
