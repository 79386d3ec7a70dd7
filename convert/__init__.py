"""Conversion of Hugging Face checkpoints to GGUF (base model + F32 LoRA adapter) and adapter export.

Shipped as the package `ggfwd.convert`. Needs no torch: safetensors are read directly, tokenizers through
`sentencepiece` / `tokenizer.json`, K-quants through llama.cpp's quantizer.
"""
