"""``--cuda_graphs``: a training micro-step recorded once as a CUDA graph, then replayed.

On a fast GPU an eager micro-step of SDXL + LoRA waits on the CPU: it issues ~25,000 kernels, whose GPU time is
about a quarter of the step (H100, benchmarks/RESULTS.md). A CUDA graph replays all of them with one launch.
What is recorded is everything between the inputs and the gradients -- UNet forward, loss, scaled backward into
the adapters' ``.grad`` -- so it must see the same shapes and the same tensors every time:

- inputs are copied into fixed buffers before each replay;
- gradients accumulate into fixed ``.grad`` tensors: the optimizer clears them in place (``zero_grad(set_to_none=
  False)``), and a replay checks that no gradient or weight was swapped for another tensor (else it stops);
- a micro-step of another shape (a smaller last batch, another aspect-ratio bucket) runs eagerly the first time,
  into the same gradients, and is recorded as a graph of its own the next (up to MAX_GRAPHS shapes). The graphs
  share one memory pool, so together they should need about the memory of the largest, not the sum (gpu_check.sh
  part 26 measures it): they never run at the same time, each one's output stays allocated (no later recording takes its place), and the train loop reads
  a replay's loss before the next replay, which may reuse the memory another graph's temporaries had;
- the first micro-steps run eagerly on a side stream (PyTorch's rule before capturing: lazy initialisations done);
- if recording fails, training continues eagerly, with a one-line warning.

The optimizer step, gradient clipping and the fp16 loss scaler's inf check stay outside the graph. Used only on
CUDA GPUs (with several processes, each records its own micro-step on the bare UNet and ``train`` averages the
gradients itself, as DDP would); with ``--train_text_encoder`` the text encoders run inside the recorded step too,
on token ids, and with ``--lora_dropout`` the dropout masks are drawn inside it (both only when asked for; see
``train.resolve_hardware``). Random numbers drawn in a graph come from the default generator as eagerly: each
replay advances it by what the recorded step drew, so a replay draws the masks an eager step would have drawn.
Gradient checkpointing then saves and restores the random-number state inside the graph (so its recompute draws
the forward's masks again), which PyTorch can record from 2.10 on.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch

WARMUP_CALLS = 3  # eager micro-steps before recording
MAX_GRAPHS = 8  # micro-step shapes recorded (one per aspect-ratio bucket in use, and a smaller last batch); more: eager


def _capture(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], pool=None):
    """Record ``fn(*inputs)`` as a CUDA graph; returns (replay, output). Nothing runs while recording. ``pool``: a
    memory pool shared with graphs recorded before (``torch.cuda.graph_pool_handle()``)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(*inputs)
    return graph.replay, out


def _on_side_stream(fn: Callable, *args, **kwargs):
    """``fn`` run eagerly on a side stream, as PyTorch asks of the calls before a recording (lazy initialisations
    done off the stream that will record); plainly where there is no CUDA."""
    if not torch.cuda.is_available():
        return fn(*args, **kwargs)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn(*args, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    return out


class MicroStepGraph:
    """Calls ``fn`` (micro-step inputs -> detached loss, gradients accumulated as a side effect), through a CUDA
    graph once warmed up, one graph per shape of the inputs. ``watched``: the tensors whose identity the graphs
    depend on (weights and gradients)."""

    def __init__(self, fn: Callable[..., torch.Tensor], watched: Callable[[], list[torch.Tensor]], *, enabled: bool,
                 say: Callable[[str], None] = print):
        self.fn, self.watched, self.enabled, self.say = fn, watched, enabled, say
        self.calls = self.replays = 0
        self.graphs: dict[tuple, tuple[Callable[[], None], list[torch.Tensor], torch.Tensor]] = {}
        self.seen: set[tuple] = set()  # shapes run eagerly at least once: lazy initialisations done
        self.pointers: list[int] = []
        self.pool = None
        self.failure: str | None = None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.fn(*inputs)
        self.calls += 1
        signature = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        if signature in self.graphs:
            self._check_pointers()
            replay, static_in, static_out = self.graphs[signature]
            for buf, t in zip(static_in, inputs):
                buf.copy_(t)
            replay()
            self.replays += 1
            return static_out
        if self.calls <= WARMUP_CALLS or signature not in self.seen or len(self.graphs) >= MAX_GRAPHS:
            self.seen.add(signature)
            return self._eager(inputs)  # warming up, or a shape met for the first time
        return self._record(inputs, signature)

    def _pointers(self) -> list[int]:
        return [0 if t is None else t.data_ptr() for t in self.watched()]

    def _check_pointers(self) -> None:
        if self._pointers() != self.pointers:
            raise RuntimeError("--cuda_graphs: a LoRA weight or gradient was replaced by another tensor after the "
                               "graph was recorded (gradients must be cleared in place)")

    def _eager(self, inputs) -> torch.Tensor:
        return _on_side_stream(self.fn, *inputs)

    def _record(self, inputs, signature) -> torch.Tensor:
        # Recorded after WARMUP_CALLS eager micro-steps: every gradient a backward reaches exists by now, so the
        # graph adds into it. One still None is never reached (the LoRA of the first text encoder's last layer,
        # whose output SDXL does not use): the graph leaves it alone, and a replay checks it stays None.
        if self.graphs:
            self._check_pointers()
        elif torch.cuda.is_available():
            self.pool = torch.cuda.graph_pool_handle()
        static_in = [t.detach().clone() for t in inputs]
        try:
            replay, static_out = _capture(self.fn, static_in, pool=self.pool)
        except Exception as exc:  # noqa: BLE001 - any failure to record means: train eagerly
            self.enabled, self.graphs = False, {}
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            self.say(f"warning: --cuda_graphs: recording the micro-step failed ({self.failure}); training without "
                     f"CUDA graphs")
            return self.fn(*inputs)
        self.graphs[signature] = replay, static_in, static_out
        self.pointers = self._pointers()
        replay()  # recording ran nothing: this micro-step's work happens now
        self.replays += 1
        return static_out


# ---------------------------------------------------------------------------------------------- sampling
MAX_SAMPLING_GRAPHS = 2  # input shapes recorded per generate() call (one, unless prompts change the batch)


class SamplingGraphs:
    """The UNet's forward during one ``generate()`` call, recorded as a CUDA graph and replayed at each denoising
    step: sampling's kernels launched at once instead of ~5,000 one by one per step.

    Installed over ``unet.forward`` for the duration of the call only (``sampling_graphs``): everything a replay
    bakes in -- LoRA scales, fused weights, attention processors -- cannot change within one call, and the graphs
    and their memory are dropped at its end. The first call of each input shape runs eagerly (warm-up), the second
    is recorded and replayed, later ones replay; tensors are copied into fixed input buffers, the output copied
    out. Gradients enabled, more shapes than ``MAX_SAMPLING_GRAPHS``, or a failed recording: eager.
    """

    def __init__(self, forward: Callable, *, say: Callable[[str], None] = print):
        self.forward, self.say = forward, say
        self.graphs: dict = {}
        self.warmed: set = set()
        self.calls = self.replays = 0
        self.failure: str | None = None

    def __call__(self, *args, **kwargs):
        from torch.utils._pytree import tree_flatten, tree_unflatten

        self.calls += 1
        leaves, spec = tree_flatten((args, kwargs))
        is_t = [isinstance(x, torch.Tensor) for x in leaves]
        tensors = [x for x, t in zip(leaves, is_t) if t]
        key = (str(spec), repr([None if t else x for x, t in zip(leaves, is_t)]),
               tuple((x.shape, x.dtype, x.device) for x in tensors))
        if key in self.graphs:
            replay, static_in, out = self.graphs[key]
            for buf, x in zip(static_in, tensors):
                buf.copy_(x)
            replay()
            self.replays += 1
            return self._output(out.clone(), kwargs)
        if self.failure or torch.is_grad_enabled() or len(self.graphs) >= MAX_SAMPLING_GRAPHS:
            return self.forward(*args, **kwargs)
        if key not in self.warmed:
            self.warmed.add(key)
            return _on_side_stream(self.forward, *args, **kwargs)

        def fn(*inputs):
            it = iter(inputs)
            a, kw = tree_unflatten([next(it) if t else x for x, t in zip(leaves, is_t)], spec)
            return self.forward(*a, **{**kw, "return_dict": False})[0]

        static_in = [x.detach().clone() for x in tensors]
        try:
            replay, out = _capture(fn, static_in)
        except Exception as exc:  # noqa: BLE001 - any failure to record means: sample eagerly
            self.failure = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
            self.say(f"warning: --cuda_graphs: recording the UNet failed ({self.failure}); sampling without CUDA graphs")
            return self.forward(*args, **kwargs)
        self.graphs[key] = (replay, static_in, out)
        replay()
        self.replays += 1
        return self._output(out.clone(), kwargs)

    @staticmethod
    def _output(sample: torch.Tensor, kwargs):
        if kwargs.get("return_dict", True):
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=sample)
        return (sample,)


def sampling_graphs_possible(unet) -> bool:
    """CUDA, and no accelerate offload hook wrapping the forward (a hook moves weights: nothing a graph may hold)."""
    return unet.device.type == "cuda" and not hasattr(unet, "_hf_hook")


@contextlib.contextmanager
def sampling_graphs(unet, enabled: bool, say: Callable[[str], None] = print) -> Iterator[SamplingGraphs | None]:
    """``unet.forward`` replaced by a ``SamplingGraphs`` for the duration (when enabled and possible), then restored."""
    if not enabled or not sampling_graphs_possible(unet):
        yield None
        return
    had_own = "forward" in vars(unet)
    previous = unet.forward
    graphs = SamplingGraphs(previous, say=say)
    unet.forward = graphs
    try:
        yield graphs
    finally:
        if had_own:
            unet.forward = previous
        else:
            del unet.forward
        graphs.graphs.clear()
