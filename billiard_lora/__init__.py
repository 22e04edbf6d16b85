"""billiard-lora: DreamBooth + LoRA fine-tuning of Stable Diffusion XL on a small image set, and generation from it."""

__version__ = "0.1.0"
