"""Shared fixtures: a tiny SDXL pipeline folder built once per test session, offline."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# the package's cache (latents, compiled code, downloads) in a folder of the test run's own, never the user's
os.environ["BILLIARD_LORA_CACHE"] = _cache = tempfile.mkdtemp(prefix="billiard_lora_tests_")
atexit.register(shutil.rmtree, _cache, ignore_errors=True)
# Under pytest-xdist (`make test` runs one worker per core), each worker and the processes it starts compute on one
# thread: the tiny models' steps are mostly Python, and two workers with a thread per core each would contend.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """An SDXL-architecture pipeline folder of random weights (a few MB), as `python -m billiard_lora.tiny` writes."""
    from billiard_lora.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sdxl", seed=0)


@pytest.fixture()
def tiny_components(tiny_model_dir):
    """Freshly loaded components (training changes them, so every test gets its own)."""
    from billiard_lora.models import load_components

    return load_components(str(tiny_model_dir))


@pytest.fixture(scope="session")
def shared_billiards() -> Path:
    """The team's real billiards photos (Kaggle layout); tests that need them skip where they are absent."""
    from billiard_lora.paths import shared_billiards_dir

    d = shared_billiards_dir()
    if d is None:
        pytest.skip("../shared/data/sports-billiards is not present (set BILLIARD_LORA_SHARED_DATA to point at it)")
    return d


@pytest.fixture()
def hub_cache(tmp_path, monkeypatch):
    """``put(repo, {name: source file})``: a Hugging Face Hub cache (this test's own, in place of the user's) holding
    those files of model repo ``repo`` at one commit, laid out as huggingface_hub's downloads leave it -- what
    hf_hub_download reads offline. Returns the snapshot folder."""
    from huggingface_hub import constants

    root = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))

    def put(repo: str, files: dict) -> Path:
        folder = root / ("models--" + repo.replace("/", "--"))
        snapshot = folder / "snapshots" / ("0123456789abcdef" * 3)[:40]
        for name, source in files.items():
            (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
            (snapshot / name).write_bytes(Path(source).read_bytes())
        (folder / "refs").mkdir(parents=True, exist_ok=True)
        (folder / "refs" / "main").write_text(snapshot.name)
        return snapshot

    return put
