"""Tools a practitioner would pick, and the ones that install here measured side by side.

The course builds each technique by hand so you know what a tool does inside.
In production you reach for a tool. :data:`TOOLS` says what each one is for;
:func:`side_by_side` runs those that install from PyPI on this machine on the
*same* model, the *same* inputs and the *same* timing harness
(:func:`course_lib.timing.compare`, interleaved) as the course's own code, and checks that
each one still computes the same logits. A tool that is not installed, or that
fails here, gets a row saying why - never a made-up number.

The workload is one forward pass of ``(1, T)`` token ids without a cache:
``T = 1`` behaves like a decode step (every weight read for one token: memory-
bound), ``T = 128`` like a prefill (compute-bound). Exporting to ONNX needs a
fixed interface, so the cache is left out for every variant alike.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import numbers
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .device import device_of
from .quantization import QuantConfig, quantize_
from .timing import compare, speed_verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tool:
    """One inference tool: what it does and when to pick it."""

    name: str
    module: str  # import name, to see whether it is installed here
    pypi: str
    what: str
    pick_when: str
    runs_on: str


TOOLS: tuple[Tool, ...] = (
    Tool("vLLM", "vllm", "vllm", "serving engine: PagedAttention KV cache, continuous batching, many kernels",
         "many concurrent users on NVIDIA/AMD GPUs; an OpenAI-compatible server", "Linux + GPU (CPU build exists)"),
    Tool("TensorRT-LLM", "tensorrt_llm", "tensorrt-llm", "NVIDIA's compiler + runtime: fused kernels, FP8/INT4, "
         "in-flight batching", "the last 20-50 % on NVIDIA GPUs, when you can afford a build step per model",
         "Linux/Windows + NVIDIA GPU"),
    Tool("llama.cpp", "llama_cpp", "llama-cpp-python", "C/C++ runtime with GGUF 2-8-bit weights, hand-tuned CPU and "
         "Metal kernels", "laptops, CPUs, Apple silicon, edge devices; one file per model", "CPU, Apple, GPU"),
    Tool("ONNX Runtime", "onnxruntime", "onnxruntime", "runs an exported ONNX graph with graph optimisations and "
         "per-platform execution providers", "deploying one graph to many runtimes (C#, Java, mobile, web)",
         "CPU, GPU, mobile, browser"),
    Tool("torchao", "torchao", "torchao", "PyTorch-native quantization (int8/int4 weight-only, FP8) and sparsity: "
         "quantize_(model, config)", "staying in PyTorch; best with torch.compile on GPU", "CPU, GPU"),
    Tool("bitsandbytes", "bitsandbytes", "bitsandbytes", "8-bit (LLM.int8) and 4-bit (NF4) layers for Hugging Face "
         "models", "fitting a big model in GPU memory (QLoRA fine-tuning); not a speed tool", "mainly NVIDIA GPU"),
    Tool("Optimum", "optimum", "optimum", "Hugging Face's bridge to ONNX Runtime, OpenVINO, Habana and others",
         "exporting and optimising HF models for a specific backend in one command", "depends on the backend"),
    Tool("torch.compile", "torch", "torch", "PyTorch's compiler: fuses ops, removes Python overhead, CUDA graphs",
         "decode loops dominated by overhead; static shapes (see notebook 03)", "CPU, GPU"),
)


def installed(tool: Tool) -> bool:
    """Is the tool's Python package importable here (without importing it)?"""
    return importlib.util.find_spec(tool.module) is not None


def tool_table() -> list[dict]:
    """:data:`TOOLS` as rows, with whether each is installed here."""
    return [dict(tool=t.name, what=t.what, pick_when=t.pick_when, runs_on=t.runs_on, pypi=t.pypi,
                 installed_here=installed(t)) for t in TOOLS]


class _LogitsOnly(torch.nn.Module):
    """ids -> logits, no cache: the fixed interface an exporter needs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, use_cache=False).logits


def export_onnx(model, path: str | Path, overwrite: bool = False) -> Path:
    """Export ``model`` (ids -> logits, any sequence length) to an ONNX file with ``torch.onnx``.

    Refuses to replace an existing file unless ``overwrite=True``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise ValueError(f"{path} exists; pass overwrite=True to replace it or choose another path")
    if importlib.util.find_spec("onnxscript") is None:
        raise ValueError("torch.onnx export needs onnxscript: pip install onnx onnxscript onnxruntime")
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.zeros(1, 8, dtype=torch.long, device=next(model.parameters()).device)
    seq = torch.export.Dim("seq", min=1, max=4096)
    torch.onnx.export(_LogitsOnly(model).eval(), (ids,), str(path), dynamo=True, input_names=["ids"],
                      output_names=["logits"], dynamic_shapes={"ids": {1: seq}}, verbose=False)
    return path


class OrtModel:
    """An ONNX Runtime session that takes and returns torch tensors (CPU execution provider)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()  # same threads as PyTorch: fair
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"ids": ids.cpu().numpy()})[0])


def _variants(model, workdir: Path) -> dict:
    """name -> (callable(ids) -> logits, or a string saying why it can't run here)."""
    eager = _LogitsOnly(model)
    out: dict = {"pytorch eager fp32": eager}
    out["pytorch eager bf16"] = _LogitsOnly(copy.deepcopy(model).to(torch.bfloat16))
    if importlib.util.find_spec("onnxruntime") is None:
        out["onnxruntime fp32"] = "not installed (pip install onnx onnxscript onnxruntime)"
    else:
        try:
            out["onnxruntime fp32"] = OrtModel(export_onnx(model, workdir / "model.onnx", overwrite=True))
        except Exception as e:  # an exporter failure is a result worth reporting, not a crash
            out["onnxruntime fp32"] = f"export failed: {type(e).__name__}: {str(e)[:160]}"
    q = copy.deepcopy(model)
    quantize_(q, QuantConfig(bits=8, embeddings="float"))
    out["course_lib int8-wo"] = _LogitsOnly(q)
    if importlib.util.find_spec("torchao") is None:
        out["torchao int8-wo"] = "not installed (pip install torchao)"
    else:
        try:
            from torchao.quantization import Int8WeightOnlyConfig
            from torchao.quantization import quantize_ as ao_quantize_

            ao = copy.deepcopy(model).to(torch.bfloat16)
            ao_quantize_(ao, Int8WeightOnlyConfig())
            out["torchao int8-wo"] = _LogitsOnly(ao)
        except Exception as e:
            out["torchao int8-wo"] = f"failed: {type(e).__name__}: {str(e)[:160]}"
    return out


@torch.inference_mode()
def side_by_side(model, seq_lens: tuple[int, ...] = (1, 128), warmup: int = 2, repeat: int = 5,
                 workdir: str | Path | None = None, seed: int = 0) -> list[dict]:
    """Time every tool variant on forward passes of ``(1, T)`` ids for each ``T`` in ``seq_lens``.

    The variants are timed *interleaved* (:func:`course_lib.timing.compare`: ``repeat``
    rounds, each variant once per round). Each row: tool, T, median ms with its p10 / p90,
    tokens/s (T / time), speed-up vs PyTorch eager fp32, the largest logit difference from
    it (a wrong answer fast is no answer), and ``verdict``: the measured speed sentence vs
    eager fp32 ("no measurable difference here" inside the spread). Rows for tools that
    cannot run here carry ``status`` with the reason.
    """
    if (not isinstance(seq_lens, (list, tuple)) or not seq_lens
            or any(isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 1 for t in seq_lens)):
        raise ValueError(f"seq_lens must be positive token counts, got {seq_lens!r}")
    model = model.eval()
    tmp = tempfile.TemporaryDirectory() if workdir is None else None
    work = Path(tmp.name if tmp else workdir)
    try:
        variants = _variants(model, work)
        vocab = model.config.vocab_size
        g = torch.Generator().manual_seed(seed)
        dev = device_of(model)
        rows = []
        for t in seq_lens:
            ids = torch.randint(0, vocab, (1, t), generator=g).to(dev)
            ref = variants["pytorch eager fp32"](ids).float()
            runnable = {name: (lambda fn=fn, ids=ids: fn(ids))
                        for name, fn in variants.items() if not isinstance(fn, str)}
            timed = compare(runnable, rounds=repeat, warmup=warmup, device=dev)  # interleaved: drift hits all alike
            base = timed["pytorch eager fp32"]
            for name, fn in variants.items():
                if isinstance(fn, str):
                    rows.append(dict(tool=name, seq_len=t, ms=None, p10_ms=None, p90_ms=None, tokens_per_s=None,
                                     speedup=None, max_abs_diff=None, status=fn))
                    continue
                res = timed[name]
                diff = (fn(ids).float().cpu() - ref.cpu()).abs().max().item()  # ONNX Runtime answers on the CPU
                rows.append(dict(tool=name, seq_len=t, ms=res.median * 1e3, p10_ms=res.p10 * 1e3,
                                 p90_ms=res.p90 * 1e3, tokens_per_s=t / res.median, speedup=base.median / res.median,
                                 max_abs_diff=diff, status="measured here",
                                 verdict=speed_verdict((name, res), ("pytorch eager fp32", base))))
        return rows
    finally:
        if tmp:
            tmp.cleanup()
