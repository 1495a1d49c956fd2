"""Quantization: int8/int4 primitives, LLM.int8(), SmoothQuant, GPTQ and quantized matmul kernels."""
