"""LoRA files from the Hugging Face Hub by repo id (``owner/name``, ``owner/name/FILE.safetensors``), through the
Hub's own cache: downloaded once, then read from there, offline too (what ``hf download`` and diffusers'
``load_lora_weights("owner/name")`` use)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError
from .lora import LORA_WEIGHT_NAME


def hub_lora(text: str) -> tuple[str, str | None] | None:
    """(repo id, file in it or None) where ``text`` reads as a LoRA on the Hub rather than a local path: owner/name
    or owner/name/FILE.safetensors, whose first part is no folder here (a mistyped local path stays one)."""
    parts = text.split("/")
    if len(parts) < 2 or text.startswith(("/", "./", "../", "~")) or "\\" in text or Path(parts[0]).exists():
        return None
    if len(parts) > 2 and not text.endswith(".safetensors"):
        return None
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id("/".join(parts[:2]))
    except Exception:  # noqa: BLE001 - HFValidationError: not a repo id
        return None
    return "/".join(parts[:2]), "/".join(parts[2:]) or None


def download_lora(repo: str, filename: str | None, *,
                  expected: str = "a LoRA .safetensors file, a training output folder, or a Hub repo") -> Path:
    """A LoRA file from a Hub model repo, through the Hub's cache (the same path on the next call, offline too):
    ``filename``, else a training run's pytorch_lora_weights.safetensors, else the repo's only .safetensors file."""
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    where = f"{repo}/{filename}" if filename else repo
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    get = (f"download it once where there is network (hf download {repo} --local-dir DIR) and pass DIR" +
           ("" if offline else ", or check the connection"))
    try:
        try:
            return Path(hf_hub_download(repo, filename or LORA_WEIGHT_NAME))
        except LocalEntryNotFoundError:  # (a subclass of the next: offline, or the Hub unreachable)
            if filename:
                raise
            cached = _cached_files(repo)  # a repo downloaded before under another file name
            if not cached:
                raise
            return _the_one(repo, cached)
        except EntryNotFoundError:
            if filename:
                raise
        found = sorted(f for f in list_repo_files(repo) if f.endswith(".safetensors"))
        return _the_one(repo, found)
    except LocalEntryNotFoundError:  # offline, or the Hub unreachable, and not in the cache
        reach = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub could not be reached"
        raise UserError(f"LoRA '{where}' is not a local path, {reach}, and the Hub's cache does not hold it: "
                        f"{get}") from None
    except EntryNotFoundError:
        raise UserError(f"LoRA '{where}': the Hub repo {repo} has no such file") from None
    except GatedRepoError:
        raise UserError(f"LoRA '{where}': the Hub repo {repo} is gated; accept its terms on huggingface.co and "
                        f"log in (hf auth login), or {get}") from None
    except RepositoryNotFoundError:
        raise UserError(f"LoRA '{where}' does not exist: not a local path, and no Hub repo of that name "
                        f"(or a private one: hf auth login); expected {expected}") from None
    except OSError as exc:  # a connection error the client did not turn into one of the above
        raise UserError(f"LoRA '{where}' could not be downloaded ({type(exc).__name__}): {get}") from None


def _the_one(repo: str, found: list[str]) -> Path:
    """The repo's only .safetensors file, through the cache; UserError naming them where there are none or several."""
    from huggingface_hub import hf_hub_download

    if len(found) == 1:
        return Path(hf_hub_download(repo, found[0]))
    if not found:
        raise UserError(f"LoRA '{repo}': the Hub repo holds no .safetensors file")
    raise UserError(f"LoRA '{repo}' holds {len(found)} .safetensors files ({', '.join(found[:4])}"
                    f"{', ...' if len(found) > 4 else ''}): pass one as {repo}/FILE")


def _cached_files(repo: str) -> list[str]:
    """The .safetensors files of ``repo`` in the Hub's cache (its main revision), as paths inside the repo."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (huggingface_hub's own errors)
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.safetensors"))


def fetch_embeddings(repo: str, lora_file: Path) -> None:
    """A LoRA trained with pivotal tuning keeps its token embeddings beside it (``*_emb.safetensors``): bring those
    of the Hub repo's folder into the cache too, so that they sit beside the downloaded LoRA file. Offline, or with
    the Hub unreachable, whatever the cache holds is what there is (``find_embeddings`` looks there)."""
    from huggingface_hub import hf_hub_download, list_repo_files

    from .pivotal import EMBEDDINGS_SUFFIX

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return
    snapshot = next((p for p in lora_file.parents if p.parent.name == "snapshots"), None)
    folder = lora_file.parent.relative_to(snapshot).as_posix() if snapshot else "."
    try:
        names = [f for f in list_repo_files(repo) if f.endswith(EMBEDDINGS_SUFFIX)
                 and (Path(f).parent.as_posix() == folder)]
        for name in names:
            hf_hub_download(repo, name)
    except Exception:  # noqa: BLE001 - unreachable now: the LoRA loads with what the cache holds (said there)
        return


# --push_to_hub: what of a run's output folder goes up. Not the checkpoints (optimizer state, resumable runs: for
# this machine), the logs, generated class images or hidden files; the LoRA files, model card, config, validation
# images, loss history and token embeddings do.
UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", "logs/**", "class_images/**", ".*", "**/.*"]


def create_upload_repo(repo: str, *, private: bool = False) -> str:
    """The Hub model repo ``--push_to_hub`` uploads to, created (or found) now, before training: a missing login,
    a name that is not the user's to write or no network stops the run at once, not after it. Returns its full id."""
    from huggingface_hub import create_repo, get_token

    if get_token() is None:
        raise UserError("--push_to_hub needs a Hugging Face login that can write: run `hf auth login` once (or set "
                        "HF_TOKEN), or drop --push_to_hub and upload the folder later with `hf upload`")
    try:
        return create_repo(repo, private=private, exist_ok=True, repo_type="model").repo_id
    except Exception as exc:  # noqa: BLE001 - HFValidationError, HfHubHTTPError (401/403), offline, connection
        raise UserError(f"--push_to_hub: the Hub repo '{repo}' could not be created or found ({type(exc).__name__}: "
                        f"{_first_line(exc)}); check the name (--hub_model_id owner/name), `hf auth whoami` and the "
                        f"connection, or drop --push_to_hub") from None


def upload_run(out: Path, repo_id: str) -> str:
    """Upload a finished run's folder (not what ``UPLOAD_IGNORE`` names) in one commit; returns the repo's URL."""
    from huggingface_hub import upload_folder

    try:
        upload_folder(repo_id=repo_id, folder_path=str(out), commit_message="End of training",
                      ignore_patterns=UPLOAD_IGNORE, repo_type="model")
    except Exception as exc:  # noqa: BLE001 - network, permissions, quota: the run itself is safe on disk
        raise UserError(f"training finished and the LoRA is saved in {out}, but uploading it to {repo_id} failed "
                        f"({type(exc).__name__}: {_first_line(exc)}); upload it later with: hf upload {repo_id} "
                        f"{out} --exclude 'checkpoint-*' 'logs/*'") from None
    return f"https://huggingface.co/{repo_id}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]
