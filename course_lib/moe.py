"""Mixture-of-experts decode in the speed lab: active parameters, the experts a batch touches, time vs batch.

A mixture-of-experts (MoE) layer holds E expert MLPs and a router that sends each token to k of them. One
token reads only its k experts, so at batch 1 an MoE model decodes like a dense model of its *active* size.
A batch of B tokens reads the union of the experts they picked, which grows toward all E
(:func:`course_lib.roofline.expected_experts`), so a server's step cost, like its memory, follows the *total*
size. This module counts both on a real transformers MoE model (OLMoE, Qwen3-MoE, Mixtral, built from the
speed lab's published shapes with random weights), reads from the router which experts a step touched, and
times decode steps at several batch sizes next to the roofline's bytes for each.
"""

from __future__ import annotations

import torch

from ._checks import check_int, check_number
from ._hf import cache_kwarg
from .device import device_of
from .generation import hf_forward
from .roofline import MoEDims, expected_experts, moe_decode_cost
from .timing import benchmark

DTYPE_BITS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 16}


def _experts_modules(model) -> list[torch.nn.Module]:
    """The modules that hold a layer's experts as 3-D tensors (expert, out, in): transformers' `*Experts`."""
    found = []
    for module in model.modules():
        n = getattr(module, "num_experts", None)
        params = list(module.parameters(recurse=False))
        if isinstance(n, int) and params and all(p.dim() == 3 and p.shape[0] == n for p in params):
            found.append(module)
    return found


def count_active_parameters(model) -> int:
    """Parameters one token uses: every parameter, less the experts its router does not pick (E - k of E).

    Works on the meta device (shapes only). The embedding counts whole, as model cards count it.
    """
    cfg = model.config
    top_k = getattr(cfg, "num_experts_per_tok", None)
    experts = _experts_modules(model)
    if not experts or not top_k:
        raise ValueError(f"{type(model).__name__} has no mixture-of-experts layers (no experts module, or no "
                         "config.num_experts_per_tok): for a dense model every parameter is active, use "
                         "count_parameters")
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    idle = sum(p.numel() * (1 - top_k / m.num_experts) for m in experts for p in m.parameters(recurse=False))
    return round(total - idle)


def routed_experts(model, ids: torch.Tensor, cache=None) -> list[torch.Tensor]:
    """The experts the router picked in one forward pass: per layer, a (tokens, top_k) tensor of expert ids.

    Read from the router's own logits (transformers' ``output_router_logits``); ``cache`` is used as the
    model's cache and left as it was (the new tokens are cropped off again).
    """
    top_k = model.config.num_experts_per_tok
    with torch.inference_mode():
        kw = {cache_kwarg(type(model)): cache} if cache is not None else {}
        out = model(input_ids=ids, use_cache=cache is not None, output_router_logits=True, **kw)
    if cache is not None:
        cache.crop(-ids.shape[1])
    logits = getattr(out, "router_logits", None)
    if not logits:
        raise ValueError(f"{type(model).__name__} returned no router logits: not a mixture-of-experts model")
    return [layer.float().topk(top_k, dim=-1).indices for layer in logits]


def distinct_experts(indices: torch.Tensor) -> int:
    """How many different experts a (tokens, top_k) tensor of routed expert ids names."""
    return int(torch.unique(indices).numel())


def decode_sweep(model, batches: tuple[int, ...] = (1, 2, 4, 8, 16), context: int = 16, warmup: int = 1,
                 repeat: int = 5, bandwidth_gbs: float | None = None, seed: int = 0) -> list[dict]:
    """Time one cached decode step of an MoE model at each batch size, beside what the roofline counts for it.

    Each row: the batch, the step's median and p10/p90 seconds, the distinct experts per layer the step's
    tokens were routed to (measured from the router, averaged over layers) and the uniform-routing expectation,
    the bytes the roofline says the step reads with the measured count, and with ``bandwidth_gbs`` (a read
    bandwidth measured on this machine) the roofline's time and the bandwidth the step achieved.
    """
    if not isinstance(batches, (tuple, list)) or not batches:
        raise ValueError(f"batches must be a non-empty tuple of batch sizes, e.g. (1, 4, 16), got {batches!r}")
    for b in batches:
        check_int("each batch size", b, 1)
    check_int("context", context, 1, " (tokens in the cache before the timed step)")
    if bandwidth_gbs is not None:
        check_number("bandwidth_gbs", bandwidth_gbs, "> 0 (GB/s, measured), or None", lambda v: v > 0)
    dims = MoEDims.from_config(model.config)
    dtype = next(model.parameters()).dtype
    bits = DTYPE_BITS.get(dtype, 16)
    dev = device_of(model)
    rows = []
    for batch in batches:
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, dims.vocab, (batch, context), generator=g).to(dev)
        tok = torch.randint(0, dims.vocab, (batch, 1), generator=g).to(dev)
        with torch.inference_mode():
            _, past = hf_forward(model, prompt)
        routed = routed_experts(model, tok, past)
        measured = sum(distinct_experts(r) for r in routed) / len(routed)

        def step(past=past, tok=tok):
            hf_forward(model, tok, past)
            past.crop(-1)  # drop the token just added: every sample sees the same context

        res = benchmark(step, warmup=warmup, repeat=repeat, device=dev)
        cost = moe_decode_cost(dims, batch, context, weight_bits=bits, kv_bits=bits, act_bits=bits,
                               experts_read=measured)
        row = dict(batch=batch, ms=res.median * 1e3, p10_ms=res.p10 * 1e3, p90_ms=res.p90 * 1e3,
                   experts_measured=measured, experts_expected=expected_experts(dims.experts, dims.top_k, batch),
                   experts_total=dims.experts, step_MB=cost.bytes / 1e6)
        if bandwidth_gbs is not None:
            row["roofline_ms"] = cost.bytes / (bandwidth_gbs * 1e9) * 1e3
            row["achieved_GBs"] = cost.bytes / res.median / 1e9
        rows.append(row)
        del past
    return rows
