"""What the notebooks share, so that they only import, configure, call and display.

Smoke mode (``BILLIARD_LORA_SMOKE=1``, what CI uses) swaps the real SDXL weights for a tiny random-weight model and
the real photos for whatever is on disk, and cuts the steps, so all four notebooks run offline on a CPU in minutes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from . import paths

SMOKE_ENV = "BILLIARD_LORA_SMOKE"


def _show_figures_as_png() -> None:
    """Our plots are plain matplotlib Figures (no pyplot state); teach IPython to display them as PNG."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    ip = get_ipython()
    if ip is None:
        return
    import io

    from matplotlib.figure import Figure

    def to_png(fig: Figure) -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()

    ip.display_formatter.formatters["image/png"].for_type(Figure, to_png)


_show_figures_as_png()


def is_smoke() -> bool:
    """True when notebooks should run the fast offline variant (tiny model, few steps)."""
    return os.environ.get(SMOKE_ENV, "0").lower() in ("1", "true", "yes")


def workdir() -> Path:
    """Where notebooks write (``outputs/notebooks`` in the repository, or $BILLIARD_LORA_WORKDIR)."""
    d = Path(os.environ.get("BILLIARD_LORA_WORKDIR", paths.OUTPUTS_DIR / "notebooks"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def model_and_vae() -> tuple[str, str | None]:
    """SDXL base and the fp16-fix VAE (the seed's), or in smoke mode a tiny random SDXL built once by our code."""
    if not is_smoke():
        from .models import SDXL_BASE, SDXL_VAE_FP16_FIX

        return SDXL_BASE, SDXL_VAE_FP16_FIX
    from .tiny import save_tiny_pipeline

    tiny = workdir() / "tiny-sdxl"
    if not (tiny / "model_index.json").exists():
        save_tiny_pipeline(tiny)
    return str(tiny), str(tiny / "vae")


def controlnet() -> str:
    """A canny SDXL ControlNet (diffusers/controlnet-canny-sdxl-1.0), or in smoke mode a tiny one for the tiny
    model, built once by our code."""
    if not is_smoke():
        return "diffusers/controlnet-canny-sdxl-1.0"
    from .tiny import save_tiny_controlnet

    tiny = workdir() / "tiny-controlnet"
    if not (tiny / "config.json").exists():
        save_tiny_controlnet(tiny)
    return str(tiny)


def billiards_dataset() -> str:
    """The billiards photos to use: $BILLIARD_LORA_DATA, the team's Kaggle-layout copy, a Kaggle download, or
    the embedded default scenes, in that order of preference."""
    if os.environ.get("BILLIARD_LORA_DATA"):
        return os.environ["BILLIARD_LORA_DATA"]
    shared = paths.shared_billiards_dir()
    if shared is not None:
        return str(shared)
    if not is_smoke() and _kaggle_credentials_present():
        return "kaggle:gpiosenka/sports-classification"
    return "default"


def _kaggle_credentials_present() -> bool:
    return bool(os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")) or \
        bool(os.environ.get("KAGGLE_API_TOKEN")) or (Path.home() / ".kaggle" / "kaggle.json").exists()


def colab_kaggle_secrets() -> bool:
    """On Colab, copy KAGGLE_USERNAME / KAGGLE_KEY from the notebook's secrets into the environment (if set)."""
    try:
        from google.colab import userdata  # type: ignore
    except ImportError:
        return False
    for key in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        try:
            value = userdata.get(key)
        except Exception:  # the secret does not exist or access was not granted
            value = None
        if value:
            os.environ[key] = value
    return _kaggle_credentials_present()


class LiveLossPlot:
    """A ``train(callback=...)`` that redraws the loss curve in the notebook every ``every`` steps."""

    def __init__(self, every: int = 10):
        self.every, self.history, self.handle = every, [], None

    def __call__(self, event: dict) -> None:
        if event.get("event") == "step":
            self.history.append({"step": event["step"], "loss": event["loss"], "lr": event["lr"]})
            if event["step"] % self.every == 0:
                self.draw()
        elif event.get("event") == "done":
            self.draw()

    def draw(self) -> None:
        from IPython.display import display

        from .viz import plot_loss

        fig = plot_loss(self.history)
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)


def image_browser(images: Sequence[Any], labels: Sequence[str] | None = None, width: int = 384):
    """An ipywidgets browser: a slider and a dropdown over ``images`` (PIL), showing one at a time with its label."""
    import io

    import ipywidgets as widgets

    labels = list(labels) if labels is not None else [str(i) for i in range(len(images))]

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        images[i].save(buf, format="PNG")
        return buf.getvalue()

    view = widgets.Image(value=png(0), format="png", width=width)
    caption = widgets.Label(labels[0])
    slider = widgets.IntSlider(0, 0, len(images) - 1, description="image")
    choose = widgets.Dropdown(options=[(lab, i) for i, lab in enumerate(labels)], value=0, description="file")

    def show(change) -> None:
        i = change["new"]
        view.value, caption.value = png(i), labels[i]
        slider.value, choose.value = i, i  # keep the two controls in step

    slider.observe(show, names="value")
    choose.observe(show, names="value")
    return widgets.VBox([widgets.HBox([slider, choose]), view, caption])
