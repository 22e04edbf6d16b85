"""Where things are: the repository, the embedded default data, the shared sample photos, the cache."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent
DATA_DIR = REPO_DIR / "data"
# The embedded default training set: billiard scenes drawn by billiard_lora.synthetic (committed PNGs).
DEFAULT_DATA_DIR = DATA_DIR / "default"
OUTPUTS_DIR = REPO_DIR / "outputs"


def cache_dir() -> Path:
    """Cache root for downloads and built models: $BILLIARD_LORA_CACHE, else ~/.cache/billiard_lora."""
    return Path(os.environ.get("BILLIARD_LORA_CACHE", Path.home() / ".cache" / "billiard_lora"))


def shared_data_dir() -> Path | None:
    """The team's sample photos (Kaggle layout) if present: $BILLIARD_LORA_SHARED_DATA or ../shared/data next to the repo."""
    env = os.environ.get("BILLIARD_LORA_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates += [REPO_DIR.parent / "shared" / "data"]
    for c in candidates:
        if (c / "sports-billiards").is_dir():
            return c
    return None


def shared_billiards_dir() -> Path | None:
    """``<shared>/sports-billiards`` (Kaggle layout: train|valid|test/billiards/*.jpg + sports.csv), or None."""
    d = shared_data_dir()
    return d / "sports-billiards" if d else None
