"""``--train_text_encoder_ti``: pivotal tuning -- new tokens whose embeddings train beside the LoRA.

As diffusers' advanced DreamBooth script (from replicate's cog-sdxl): each ``--token_abstraction`` (``TOK``) in the
instance prompt, captions and validation prompts becomes ``--num_new_tokens_per_abstraction`` new tokens
(``<s0><s1>``), added to both tokenizers, whose embedding rows in both text encoders are learned; everything else of
the text encoders stays frozen. The rows are saved as ``FOLDER_emb.safetensors`` beside the LoRA, one tensor per
encoder under the names A1111 and ComfyUI read for SDXL (``clip_l``, ``clip_g``); diffusers loads them with
``pipe.load_textual_inversion(state_dict["clip_l"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder,
tokenizer=pipe.tokenizer)`` (and ``clip_g`` into ``text_encoder_2``), and ``generate`` does so by itself.

Here the new rows are a small float32 parameter of their own, looked up in place of the encoder's embedding for the
new token ids (``NewTokenEmbedding``), so that the optimizer holds a few thousand numbers instead of two embedding
matrices (49,408 rows each), and the caller's tokenizers and text encoders are left as they were.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import UserError

EMBEDDINGS_SUFFIX = "_emb.safetensors"  # FOLDER_emb.safetensors, as diffusers' advanced script names it
ENCODER_KEYS = ("clip_l", "clip_g")  # text_encoder (CLIP ViT-L), text_encoder_2 (OpenCLIP ViT-bigG)
TOKENS_KEY = "billiard_lora.tokens"  # the header entry: {abstraction: [token, ...]}


def token_map(abstractions: str, per_abstraction: int) -> dict[str, list[str]]:
    """``"TOK,TOK2"``, 2 -> ``{"TOK": ["<s0>", "<s1>"], "TOK2": ["<s2>", "<s3>"]}``."""
    names = [a.strip() for a in abstractions.split(",") if a.strip()]
    out: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        out[name] = [f"<s{i * per_abstraction + j}>" for j in range(per_abstraction)]
    return out


def insert_tokens(text: str | None, mapping: dict[str, list[str]]) -> str | None:
    """Each abstraction (a whole word: ``TOK``, not the start of ``TOKYO``) replaced by its tokens."""
    if not text:
        return text
    for name, tokens in mapping.items():
        text = re.sub(rf"(?<![\w<]){re.escape(name)}(?!\w)", "".join(tokens), text)
    return text


def mentions(text: str | None, name: str) -> bool:
    return bool(text) and re.search(rf"(?<![\w<]){re.escape(name)}(?!\w)", text) is not None


class NewTokenEmbedding(torch.nn.Module):
    """A text encoder's token embedding with learned rows for some token ids (the others: the frozen ``base``)."""

    def __init__(self, base: torch.nn.Embedding, ids: list[int], rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.rows = torch.nn.Parameter(rows)
        slot = torch.full((max(base.num_embeddings, max(ids) + 1),), -1, dtype=torch.long)
        slot[torch.tensor(ids)] = torch.arange(len(ids))
        self.register_buffer("slot", slot.to(base.weight.device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:  # what code that reads an input embedding's weight expects (dtype, device)
        return self.base.weight

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # every position computed both ways and chosen by a mask: no data-dependent branch (a CUDA graph records it)
        slot = self.slot[ids]
        out = self.base(ids.clamp(max=self.base.num_embeddings - 1))
        new = F.embedding(slot.clamp(min=0), self.rows.to(out.dtype))
        return torch.where((slot >= 0).unsqueeze(-1), new, out)


class PivotalTuning:
    """The new tokens of a run: copies of the tokenizers that know them, and their rows in both text encoders.

    ``undo()`` gives the text encoders their own embeddings back (the tokenizers given were never changed)."""

    def __init__(self, mapping: dict[str, list[str]], tokenizers, text_encoders, seed: int):
        self.mapping = mapping
        self.tokens = [t for tokens in mapping.values() for t in tokens]
        self.tokenizers = [copy.deepcopy(t) for t in tokenizers]
        self.layers: list[tuple[torch.nn.Module, torch.nn.Module, NewTokenEmbedding]] = []
        gen = torch.Generator().manual_seed(seed)
        for tokenizer, encoder in zip(self.tokenizers, text_encoders):
            taken = [t for t in self.tokens if t in tokenizer.get_vocab()]
            if taken:
                raise UserError(f"--train_text_encoder_ti: the tokenizer already has {taken[0]}: train on a base "
                                f"model without earlier textual-inversion tokens")
            tokenizer.add_special_tokens({"additional_special_tokens": self.tokens})  # as diffusers' script
            ids = tokenizer.convert_tokens_to_ids(self.tokens)
            base = encoder.get_input_embeddings()
            # new rows drawn around the existing ones' spread (diffusers' script: randn x their std)
            rows = torch.randn(len(ids), base.embedding_dim, generator=gen) * base.weight.float().std().cpu()
            layer = NewTokenEmbedding(base, ids, rows.to(base.weight.device))
            encoder.set_input_embeddings(layer)
            self.layers.append((encoder, base, layer))

    def params(self) -> list[torch.nn.Parameter]:
        return [layer.rows for _, _, layer in self.layers]

    def insert(self, text: str | None) -> str | None:
        return insert_tokens(text, self.mapping)

    def undo(self) -> None:
        for encoder, base, layer in self.layers:
            if encoder.get_input_embeddings() is layer:
                encoder.set_input_embeddings(base)

    # ---- the rows as the file and the checkpoints hold them
    def state(self) -> dict[str, torch.Tensor]:
        return {key: layer.rows.detach().float().cpu() for key, (_, _, layer) in zip(ENCODER_KEYS, self.layers)}

    def load_state(self, state: dict[str, torch.Tensor], source: str) -> None:
        for key, (_, _, layer) in zip(ENCODER_KEYS, self.layers):
            if key not in state or state[key].shape != layer.rows.shape:
                raise UserError(f"{source}: its {key} token embeddings do not fit this run's "
                                f"--token_abstraction/--num_new_tokens_per_abstraction: resume with the same settings")
            with torch.no_grad():
                layer.rows.copy_(state[key])

    def save(self, path: Path, metadata: dict | None = None) -> Path:
        from .io import save_safetensors

        header = {TOKENS_KEY: json.dumps(self.mapping)}
        if metadata:
            from .lora import METADATA_KEY

            header[METADATA_KEY] = json.dumps(metadata, default=str)
        save_safetensors(self.state(), path, metadata=header)
        return path


def embeddings_file(folder: Path) -> Path:
    """Where a training output or checkpoint folder keeps its token embeddings."""
    return folder / f"{folder.name}{EMBEDDINGS_SUFFIX}"


def find_embeddings(lora_file: Path) -> Path | None:
    """The token embeddings trained with the LoRA in ``lora_file`` (its folder's ``*_emb.safetensors``), if any."""
    folder = lora_file.parent
    own = embeddings_file(folder)
    if own.is_file():
        return own
    found = sorted(folder.glob(f"*{EMBEDDINGS_SUFFIX}"))
    return found[0] if len(found) == 1 else None


def read_embeddings(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """(the rows per encoder, {abstraction: tokens}); UserError for a file that is not such embeddings."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged file: one line
        raise UserError(f"token embeddings {path} cannot be read ({exc}); train again or remove the file") from None
    if set(state) != set(ENCODER_KEYS):
        raise UserError(f"token embeddings {path} hold {', '.join(sorted(state))}, not {' and '.join(ENCODER_KEYS)}")
    try:
        mapping = json.loads(header[TOKENS_KEY])
    except (KeyError, ValueError):
        n = state["clip_l"].shape[0]
        mapping = {"TOK": [f"<s{i}>" for i in range(n)]}  # diffusers' advanced script's default
    if sum(len(v) for v in mapping.values()) != state["clip_l"].shape[0]:
        raise UserError(f"token embeddings {path}: its header names other tokens than it holds rows")
    return state, mapping
