"""What ``quantize_`` does (:class:`QuantConfig`, validated on creation), what it did (:class:`QuantReport`), and
:data:`PRESETS`, the one table of named formats that the benchmark suites and the notebooks use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from .._checks import check_int, check_number
from .kernels import COMPUTE_DTYPES, FLOAT, INT4_CPU, INT4_CUDA, INT8PACK, INT_MM, KERNEL_REQUESTS
from .registry import get_method, method_for, method_names, selected_methods

INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the aten int4 kernel takes
ACTIVATIONS = ("none", "int8")  # "int8": rounded at run time, per token (W8A8) or per group of 32 (W4A8)


@dataclass(frozen=True)
class QuantConfig:
    """What ``quantize_`` does. Validated on creation.

    bits: 8 (int8, symmetric, one scale per output channel) or 4 (int4, asymmetric, per group).
    group_size: int4 only; one of 32, 64, 128, 256 (what the aten int4 kernel takes).
    method: "rtn" (round to nearest), "gptq" (error-compensating: needs calibration token ids) or "awq"
        (activation-aware scaling for int4: needs calibration token ids).
    activations: "none" (weight-only) or "int8": rounded to int8 at run time, per token with bits=8 (W8A8), per
        group of 32 inputs with bits=4 and group_size=32 (W4A8, llama.cpp's Q4_0 x Q8_0: integer dot products
        in the native decode kernel).
    smooth: W8A8 only, SmoothQuant's alpha in [0, 1] (needs calibration): per input channel
        s = max|x|^alpha / max|w|^(1 - alpha) moves activation outliers into the weights (x / s, W * s).
    embeddings: "int8" quantizes the output head (and the input embedding, sharing its int8
        storage when the two are tied) to int8 per row; "float" leaves both as they are.
    compute_dtype: the activations' dtype for the kernel, or "auto": measured per layer shape on this machine.
    kernel: "packed" (default: the fastest correct kernel measured here among those that keep the integers),
        "auto" (the same, with the float matmul of the layer it replaced among the candidates, so no layer is
        slower than before; a layer that picks it holds a float copy, and the model gets no smaller), "stream"
        (the packed candidates plus the compiled streaming reductions of :mod:`.streaming`, fast at decode's
        one row; compiling them takes seconds to a minute once per process), "reference"
        (dequantize + F.linear), or one kernel by name (e.g. "aten._weight_int8pack_mm"), used where it is safe.
    skip: regular expressions of module names left in float (``re.search``), the output head and the
        input embedding included (``skip=("lm_head",)``); checked when the config is created.
    """

    bits: int = 8
    group_size: int | None = None
    method: str = "rtn"
    embeddings: str = "int8"
    compute_dtype: str = "auto"
    kernel: str = "packed"
    skip: tuple[str, ...] = ()
    gptq_damp: float = 0.01
    gptq_block: int = 128
    activations: str = "none"
    smooth: float | None = None

    def __post_init__(self):
        if isinstance(self.bits, bool) or self.bits not in (4, 8) or not isinstance(self.bits, int):
            raise ValueError(f"bits must be 8 or 4 for packed layers, got {self.bits!r} "
                             "(use fake_quantize to simulate 2-8 bits)")
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("int8 uses one scale per output channel; leave group_size=None")
        if self.bits == 4 and (type(self.group_size) is not int or self.group_size not in INT4_GROUP_SIZES):
            # type() check: 128.0 == 128 would pass the `in` test and break the kernel later
            raise ValueError(f"int4 needs an int group_size in {INT4_GROUP_SIZES}, got {self.group_size!r}; "
                             "try QuantConfig(bits=4, group_size=64) (it must also divide the layers' in_features)")
        if self.method not in method_names():
            raise ValueError(f"method must be one of {method_names()}, got {self.method!r}")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r} "
                             "('int8' is W8A8: QuantConfig(bits=8, activations='int8'))")
        if self.activations == "int8" and self.bits == 4 and self.group_size != 32:
            raise ValueError(f"activations='int8' with bits=4 (W4A8) rounds the activations in the weights' groups "
                             f"of 32; got group_size={self.group_size!r}: "
                             "QuantConfig(bits=4, group_size=32, activations='int8')")
        if self.activations == "int8" and self.method != "rtn":
            raise ValueError(f"W8A8 and W4A8 round weights to nearest (method='rtn'); got method={self.method!r}. "
                             "For activation outliers use smooth=0.5 (SmoothQuant, W8A8) instead")
        for method in (get_method(self.method), *selected_methods(self)):  # each method's own rules
            if method.check is not None:
                method.check(self)
        if self.embeddings not in ("int8", "float"):
            raise ValueError(f"embeddings must be 'int8' or 'float', got {self.embeddings!r}")
        if self.compute_dtype != "auto" and (not isinstance(self.compute_dtype, str)
                                             or self.compute_dtype not in COMPUTE_DTYPES):
            raise ValueError(f"compute_dtype must be 'auto' or one of {sorted(COMPUTE_DTYPES)}, "
                             f"got {self.compute_dtype!r}")
        named = (INT8PACK,) if self.bits == 8 else (INT4_CPU, INT4_CUDA)
        if self.activations == "int8" and self.bits == 8:
            named = (INT_MM,)
        if self.kernel not in KERNEL_REQUESTS + named:
            raise ValueError(f"kernel must be one of {KERNEL_REQUESTS + named} for {self.name}, got {self.kernel!r}")
        if not isinstance(self.skip, tuple):
            raise ValueError("skip must be a tuple of regular expressions, e.g. skip=('mlp.down_proj',)")
        for pattern in self.skip:
            if not isinstance(pattern, str):
                raise ValueError(f"skip patterns must be strings (regular expressions), got {pattern!r}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"skip pattern {pattern!r} is not a valid regular expression ({e}); "
                                 "escape special characters, e.g. skip=(r'layers\\.0\\.mlp',)") from e
        check_number("gptq_damp", self.gptq_damp, "in (0, 1) (GPTQ's damping, a fraction of the mean diagonal; "
                     "0.01 is usual)", lambda v: 0 < v < 1)
        check_int("gptq_block", self.gptq_block, 1, " (columns per GPTQ block; 128 is usual)")

    @property
    def name(self) -> str:
        if self.activations == "int8" and self.bits == 4:
            return "w4a8-g32"
        if self.activations == "int8":
            return "w8a8" + (f"-sq{self.smooth:g}" if self.smooth is not None else "")
        g = f"-g{self.group_size}" if self.group_size else ""
        prefix = "" if self.method == "rtn" else f"{self.method}-"
        return f"{prefix}int{self.bits}-wo{g}"

    @property
    def needs_calibration(self) -> bool:
        return method_for(self).needs_calibration

    def dtype(self) -> torch.dtype | str:
        return "auto" if self.compute_dtype == "auto" else COMPUTE_DTYPES[self.compute_dtype]


@dataclass
class QuantReport:
    """What ``quantize_`` did, layer by layer."""

    quantized: dict[str, str]  # name -> kernel
    skipped: dict[str, str]  # name -> reason
    warnings: list[str] = field(default_factory=list)
    scaled: dict[str, str] = field(default_factory=dict)  # AWQ / SmoothQuant: name -> alpha and where s went

    def summary(self) -> str:
        kernels: dict[str, int] = {}
        for k in self.quantized.values():
            kernels[k] = kernels.get(k, 0) + 1
        text = f"{len(self.quantized)} layers quantized {kernels}, {len(self.skipped)} left in float"
        if self.scaled:
            folded = sum("folded" in v for v in self.scaled.values())
            text += (f"; {len(self.scaled)} scaled per input channel ({folded} folded into a norm, "
                     f"{len(self.scaled) - folded} with an input_scale)")
        if kernels.get(FLOAT):
            text += (f"; {kernels[FLOAT]} run the float matmul of the layer they replaced (measured faster here "
                     "than every integer kernel; kernel='packed' keeps the integers)")
        return text + "".join(f"\nWARNING: {w}" for w in self.warnings)


# Every named format, as QuantConfig keywords: build one with preset(name). Names differ where the formats do
# (int4-wo-g32 and int4-wo-g128 are not the same numbers); each suite names the rows it measures by these.
PRESETS: dict[str, dict] = {
    "int8-wo": dict(bits=8),
    "int4-wo-g32": dict(bits=4, group_size=32),
    "int4-wo-g128": dict(bits=4, group_size=128),
    "gptq-int4-g32": dict(bits=4, group_size=32, method="gptq"),
    "gptq-int4-g128": dict(bits=4, group_size=128, method="gptq"),
    "awq-int4-g32": dict(bits=4, group_size=32, method="awq"),
    "w8a8": dict(bits=8, activations="int8"),
    "w8a8-sq0.5": dict(bits=8, activations="int8", smooth=0.5),
    # a fixed compute dtype (bf16 activations into the packed kernels), or every kernel and dtype measured here
    "int8-wo-bf16": dict(bits=8, compute_dtype="bfloat16"),
    "int4-wo-g32-bf16": dict(bits=4, group_size=32, compute_dtype="bfloat16"),
    "int8-wo-auto": dict(bits=8, kernel="auto"),
    "int4-wo-g32-auto": dict(bits=4, group_size=32, kernel="auto"),
    "w8a8-auto": dict(bits=8, activations="int8", kernel="auto"),
    # the packed kernels and the compiled streaming reductions, measured (:mod:`.streaming`)
    "int8-wo-stream": dict(bits=8, kernel="stream"),
    "int4-wo-g32-stream": dict(bits=4, group_size=32, kernel="stream"),
    # int4 weights x int8 activations (groups of 32): llama.cpp's Q4_0 x Q8_0, integer dot products when streaming
    "w4a8-g32": dict(bits=4, group_size=32, activations="int8"),
    "w4a8-g32-stream": dict(bits=4, group_size=32, activations="int8", kernel="stream"),
}


def preset(name: str, **overrides) -> QuantConfig:
    """The :class:`QuantConfig` of a named format (:data:`PRESETS`), with any field overridden."""
    if name not in PRESETS:
        raise ValueError(f"no quantization preset {name!r}; the presets are {sorted(PRESETS)}")
    return QuantConfig(**{**PRESETS[name], **overrides})
