"""Accessory: run LLaMA2-Accessory checkpoints on a laptop CPU or many GPUs."""

__version__ = "0.1.0"
