"""Quantization: int8/int4 primitives, LLM.int8(), SmoothQuant, GPTQ and quantized matmul kernels.

One technique per module: ``primitives`` (absmax / zero-point, int4 packing, fp8), ``linear``
(QuantizedLinear and the storage format the kernels read), ``llm_int8`` (Dettmers et al. 2022),
``smoothquant`` (Xiao et al. 2023), ``gptq`` (Frantar et al. 2022, with RTN), ``model``
(quantize_model, save/load). Tour rows: ``checks``.
"""

from mlsys_ref.quant.gptq import gptq_quantize, gptq_reference, rtn_quantize
from mlsys_ref.quant.linear import QuantizedLinear
from mlsys_ref.quant.llm_int8 import Int8Linear, int8_matmul, llm_int8_matmul
from mlsys_ref.quant.model import load_quantized, quantize_model, save_quantized
from mlsys_ref.quant.primitives import dequantize, pack_int4, quantize, quantize_fp8, unpack_int4
from mlsys_ref.quant.smoothquant import smooth_model, smoothing_factors

__all__ = [
    "QuantizedLinear", "Int8Linear", "quantize", "dequantize", "pack_int4", "unpack_int4", "quantize_fp8",
    "int8_matmul", "llm_int8_matmul", "smoothing_factors", "smooth_model", "gptq_quantize", "gptq_reference",
    "rtn_quantize", "quantize_model", "save_quantized", "load_quantized",
]
