"""``python -m billiard_lora <command> [args]``: one entry point for every tool in the package."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("billiard_lora.train", "DreamBooth-LoRA training (diffusers' train_dreambooth_lora_sdxl.py flags)"),
    "generate": ("billiard_lora.generate", "images from SDXL + LoRA(s): prompt grids, scale sweeps, checkpoints"),
    "audit": ("billiard_lora.audit", "check a folder of training images before training"),
    "caption": ("billiard_lora.caption", "caption training photos with BLIP (a .txt beside each)"),
    "lora": ("billiard_lora.lora_tools", "inspect, convert, resize, combine or merge a LoRA file"),
    "evaluate": ("billiard_lora.evaluate", "DINO / CLIP-I / CLIP-T / PRES / DIV per checkpoint"),
    "demo": ("billiard_lora.demo", "the whole pipeline on the embedded default data and a tiny model"),
    "tiny": ("billiard_lora.tiny", "write a tiny random-weight SDXL pipeline folder (offline tests)"),
    "synthetic": ("billiard_lora.synthetic", "re-draw the embedded default billiard scenes"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m billiard_lora <command> [args]   (each command has --help)\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        print(f"error: unknown command '{name}'{hint}; run python -m billiard_lora --help", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"python -m billiard_lora {name}", *rest]
    return module.main(rest) or 0


if __name__ == "__main__":
    raise SystemExit(main())
