"""Export quantized models to the engines people deploy on: compressed-tensors (vLLM, HF) and GGUF (llama.cpp)."""
