"""billiard-lora: DreamBooth + LoRA fine-tuning of Stable Diffusion XL on a small image set, and generation from it."""

import logging as _logging

__version__ = "0.1.0"

# Two import-time notices that say nothing actionable to our users: bitsandbytes' optional CPU 4-bit kernel (we
# never use 4-bit) and transformers' fallback to the PIL image processor (we never use torchvision there).
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
_logging.getLogger("transformers.utils.import_utils").setLevel(_logging.ERROR)
