"""Prompts longer than CLIP's 77 tokens, and weighted words: ``generate(..., prompt_weighting=True)``.

SDXL's text encoders read 77 tokens; diffusers' pipeline cuts the rest off (with transformers' warning about
"indexing errors"). With prompt weighting on, the prompts are encoded by compel (the library diffusers' docs use for
this): a long prompt in 75-token chunks whose embeddings are concatenated, as A1111 and ComfyUI do, and weights in
compel's syntax (``billiard++``, ``(green felt)1.3``, ``smoke-``) or A1111's ``(green felt:1.3)``, which is rewritten
to compel's. A prompt without weights that fits 77 tokens gives exactly the pipeline's own embeddings (tested).
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch

from .errors import UserError

# A1111/ComfyUI's explicit weight: "(words:1.3)"; compel writes "(words)1.3"
_A1111_WEIGHT = re.compile(r"\(([^():]+):\s*([0-9]*\.?[0-9]+)\s*\)")


def a1111_to_compel(text: str) -> str:
    """``(words:1.3)`` -> ``(words)1.3``; everything else as written (compel reads its own syntax)."""
    return _A1111_WEIGHT.sub(lambda m: f"({m.group(1).strip()}){m.group(2)}", text)


def token_count(pipe, text: str) -> int:
    """The tokens of ``text`` in the pipeline's first tokenizer, start and end tokens included."""
    return len(pipe.tokenizer(text, truncation=False, add_special_tokens=True).input_ids)


def too_long(pipe, texts) -> list[tuple[str, int]]:
    """The prompts that SDXL's text encoders would cut (more than the tokenizer's 77 tokens), with their counts."""
    limit = pipe.tokenizer.model_max_length
    counts = [(t, token_count(pipe, t)) for t in texts if t]
    return [(t, n) for t, n in counts if n > limit]


def _compel(pipe):
    try:
        from compel import CompelForSDXL
    except ImportError:
        raise UserError("prompt weighting needs the compel package: pip install compel") from None
    device = getattr(pipe, "_execution_device", None) or pipe.device
    made = getattr(pipe, "billiard_compel", None)
    if made is None or made[0] != str(device):
        made = (str(device), CompelForSDXL(pipe, device=str(device)))
        pipe.billiard_compel = made
    return made[1]


@contextlib.contextmanager
def _readable(prompt: str) -> Iterator[None]:
    """compel's and pyparsing's parser errors (several lines long) as one line naming the prompt."""
    try:
        with torch.no_grad():
            yield
    except Exception as exc:  # noqa: BLE001 - only the parsers' own errors are translated
        if not type(exc).__module__.startswith(("compel", "pyparsing")):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"prompt {prompt!r}: compel cannot read its weights ({first}); check the brackets, e.g. "
                        f"(green felt:1.3), (green felt)1.3 or (\"a\", \"b\").blend(0.7, 0.3)") from None


def weighted_embeddings(pipe, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
    """The pipeline's ``prompt_embeds`` and ``pooled_prompt_embeds`` (and the negative ones where a negative prompt is
    given: without one, SDXL's pipeline zeroes the unconditional embeddings as it does for ``negative_prompt=None``)."""
    compel = _compel(pipe)
    with _readable(prompt):
        cond = compel(a1111_to_compel(prompt),
                      negative_prompt=a1111_to_compel(negative_prompt) if negative_prompt else None)
    out = {"prompt_embeds": cond.embeds, "pooled_prompt_embeds": cond.pooled_embeds}
    if negative_prompt:
        out.update(negative_prompt_embeds=cond.negative_embeds,
                   negative_pooled_prompt_embeds=cond.negative_pooled_embeds)
    return out


def refiner_embeddings(refiner, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
    """The SDXL refiner's text inputs through compel: its one text encoder (OpenCLIP bigG's penultimate layer and
    pooled output, as the refiner's pipeline encodes), the prompt and the negative prompt ("" without one, as the
    refiner encodes it) padded to the same chunks."""
    try:
        from compel import Compel, ReturnedEmbeddingsType
    except ImportError:
        raise UserError("prompt weighting needs the compel package: pip install compel") from None
    device = getattr(refiner, "_execution_device", None) or refiner.device
    compel = Compel(tokenizer=refiner.tokenizer_2, text_encoder=refiner.text_encoder_2, device=str(device),
                    returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
                    requires_pooled=True, truncate_long_prompts=False)
    with _readable(prompt):
        embeds, pooled = compel([a1111_to_compel(prompt), a1111_to_compel(negative_prompt or "")])
    return {"prompt_embeds": embeds[:1], "pooled_prompt_embeds": pooled[:1],
            "negative_prompt_embeds": embeds[1:], "negative_pooled_prompt_embeds": pooled[1:]}
