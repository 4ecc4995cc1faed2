"""vla_ds: train Vision-Language-Action policies (Qwen2.5-VL + sensor encoder + diffusion action expert) with DeepSpeed."""

__version__ = "0.1.0"
