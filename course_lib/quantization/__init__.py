"""Quantization: store weights in fewer bits so each decoded token reads fewer bytes.

Decode reads every weight once per token, so it is limited by memory bandwidth: store the weights in fewer bytes
and each token gets cheaper. The package, read in this order:

* :mod:`.primitives` - what chapter 05 derives by hand: quantize / dequantize, the error, int4 packing;
* :mod:`.kernels`, :mod:`.kernel_choice`, :mod:`.layers` - packed int8 / int4 / W8A8 layers whose kernel is
  measured on this machine; :mod:`.streaming` - compiled decode kernels that read each weight once;
  :mod:`.native` - the same products written by hand in C++ (AVX-512, built at first use), which they run where built;
* :mod:`.config` - :class:`QuantConfig` and :data:`PRESETS`, the named formats the suites and notebooks use;
* :mod:`.registry` and the methods - :mod:`.rtn`, :mod:`.gptq`, :mod:`.awq` (AWQ and SmoothQuant), the
  calibrated ones sharing one walk over the decoder blocks (:mod:`.calibration`);
* :mod:`.api` - ``quantize_(model, QuantConfig(...))`` replaces ``nn.Linear`` layers in place;
* :mod:`.save` - ``save_quantized(model, folder)``; ``course_lib.load_model(folder)`` rebuilds the model.

A new method is one module that registers a :class:`Method` and is imported below.
"""

# isort: off
# Importing a method module registers it; in this order, the order error messages list them in.
from . import rtn, gptq, awq  # noqa: F401
# isort: on
from . import kernel_choice
from .api import quantize_
from .awq import AWQ_ALPHAS, MAX_CALIB_ROWS, awq_scales, smoothquant_scales
from .calibration import SHARED_INPUTS
from .config import ACTIVATIONS, INT4_GROUP_SIZES, PRESETS, QuantConfig, QuantReport, preset
from .gptq import gptq_quantize_weight
from .kernel_choice import Candidate
from .kernels import (
    COMPUTE_DTYPES,
    FLOAT,
    INT4_CPU,
    INT4_CUDA,
    INT4_MID,
    INT8_KERNEL_ALIGN,
    INT8_KERNEL_K_MULTIPLE,
    INT8PACK,
    INT_MM,
    KERNEL_REQUESTS,
    REFERENCE,
)
from .layers import (
    AUTO_DTYPES,
    PACKED_LINEARS,
    REF_ROWS,
    TORCH_OPS_ROWS,
    Int4A8Linear,
    Int4WeightOnlyLinear,
    Int8DynamicLinear,
    Int8Embedding,
    Int8WeightOnlyLinear,
    is_quantized,
)
from .primitives import (
    GRANULARITIES,
    Quantized,
    dequantize,
    fake_quantize,
    fake_quantize_model_,
    mse,
    pack_int4,
    qrange,
    quantize,
    quantize_activations,
    round_activation_groups,
    sqnr_db,
    unpack_int4,
)
from .registry import Method, method_names, register
from .save import QUANT_FILE, QUANT_OUTPUTS, QUANT_WEIGHTS, load_quantized, save_quantized
from .streaming import STREAM, STREAM_ROWS, StreamingLinear, stream_

METHODS = method_names()  # the built-in methods (a method registered later is in method_names())

__all__ = [
    "ACTIVATIONS", "AUTO_DTYPES", "AWQ_ALPHAS", "COMPUTE_DTYPES", "FLOAT", "GRANULARITIES", "INT4_CPU", "INT4_CUDA",
    "INT4_GROUP_SIZES", "INT4_MID", "INT8PACK", "INT8_KERNEL_ALIGN", "INT8_KERNEL_K_MULTIPLE", "INT_MM",
    "KERNEL_REQUESTS", "MAX_CALIB_ROWS", "METHODS", "PACKED_LINEARS", "PRESETS", "QUANT_FILE", "QUANT_OUTPUTS",
    "QUANT_WEIGHTS",
    "REFERENCE", "REF_ROWS", "SHARED_INPUTS", "STREAM", "STREAM_ROWS", "StreamingLinear", "stream_",
    "TORCH_OPS_ROWS", "Candidate", "Int4A8Linear", "Int4WeightOnlyLinear",
    "Int8DynamicLinear", "Int8Embedding", "Int8WeightOnlyLinear", "Method", "QuantConfig", "QuantReport", "Quantized",
    "awq_scales", "dequantize", "fake_quantize", "fake_quantize_model_", "gptq_quantize_weight", "is_quantized",
    "kernel_choice", "load_quantized", "method_names", "mse", "pack_int4", "preset", "qrange", "quantize",
    "quantize_", "quantize_activations", "register", "round_activation_groups", "save_quantized",
    "smoothquant_scales", "sqnr_db", "unpack_int4",
]
