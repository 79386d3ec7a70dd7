"""ggfwd: forward-only (backpropagation-free) LoRA fine-tuning through llama.cpp."""

__version__ = "0.1.0"
