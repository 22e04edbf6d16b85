"""SDXL conditioning as pure tensor helpers: the two-encoder prompt embedding and the size/crop ``add_time_ids``."""

from __future__ import annotations

from typing import Sequence

import torch


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (B, 77), padded and truncated to the tokenizer's maximum length, as SDXL was trained."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompt(text_encoders: Sequence, tokenizers: Sequence | None, prompts: Sequence[str] | None = None, *,
                  input_ids: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts with SDXL's two CLIP encoders.

    Returns ``prompt_embeds`` (B, 77, 768 + 1280): each encoder's penultimate hidden state, concatenated on the
    feature axis, and ``pooled_prompt_embeds`` (B, 1280): the second encoder's projected pooled output.
    Pass ``input_ids`` (one tensor per encoder) instead of prompts when they are already tokenized.
    """
    embeds, pooled = [], None
    for i, encoder in enumerate(text_encoders):
        ids = input_ids[i] if input_ids is not None else tokenize(tokenizers[i], prompts)
        out = encoder(ids.to(encoder.device), output_hidden_states=True, return_dict=True)
        embeds.append(out.hidden_states[-2])  # SDXL conditions on the penultimate layer of both encoders
        # Only the last encoder's pooled output is used (CLIPTextModelWithProjection: text_embeds).
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    prompt_embeds = torch.cat(embeds, dim=-1)
    return prompt_embeds, pooled.view(prompt_embeds.shape[0], -1)


def compute_time_ids(original_size: Sequence[int], crops_coords_top_left: Sequence[int],
                     target_size: Sequence[int], *, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """SDXL's micro-conditioning vector (6,): original (h, w), crop top-left (top, left), target (h, w)."""
    values = list(original_size) + list(crops_coords_top_left) + list(target_size)
    if len(values) != 6:
        raise ValueError(f"expected 2 + 2 + 2 numbers, got {values}")
    return torch.tensor(values, dtype=dtype, device=device)


def batch_time_ids(original_sizes: Sequence[Sequence[int]], crops: Sequence[Sequence[int]], resolution: int, *,
                   dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """Stack ``compute_time_ids`` for a batch (B, 6); the target size is the square training resolution."""
    return torch.stack([compute_time_ids(o, c, (resolution, resolution), dtype=dtype, device=device)
                        for o, c in zip(original_sizes, crops)])
