"""lora-sweep: hyperparameter sweeps for LoRA fine-tuning on Ray Tune."""

__version__ = "0.1.0"
