"""Pruning: removing weights, and why only *structured* removal makes a model faster.

Two ideas share the name:

* **unstructured** pruning zeroes individual weights (the smallest in magnitude).
  The matrices keep their shape, so a dense kernel multiplies the zeros just
  as fast as any other number: "50% sparse" is exactly as slow as dense.
* **structured** pruning deletes whole rows and columns - MLP channels,
  attention heads - so the matrices become physically smaller and every
  decode step moves fewer bytes.

Structured removal must respect what is *coupled*: dropping channel ``j`` of
an MLP removes row ``j`` of ``gate_proj`` and ``up_proj`` and column ``j`` of
``down_proj`` together. Torch-Pruning's ``DependencyGraph`` discovers such
couplings by tracing the model; we use it for the MLP, where
``get_pruning_group`` works and its ``details()`` show the learner what is
coupled. For attention the graph is of no use on this stack: Torch-Pruning
1.6.1's ``get_pruning_group`` on ``q/k/v_proj`` of a Hugging Face Llama never
returns (its index propagation loops through the rotary-embedding ops), so
the high-level pruners hang too. We write the attention coupling down by hand
instead - it is short - and cut with Torch-Pruning's own low-level pruning
functions. Grouped-query attention offers two granularities: a KV head is
shared by ``num_attention_heads // num_key_value_heads`` query heads, so a KV
head goes together with all of its query heads (one *KV group*, ``head_ratio``:
smaller K/V cache too); or every KV group loses the same number of its query
heads (``query_ratio``: the KV heads and the cache stay, each is still shared by
equally many query heads, which is valid grouped-query attention). Removing
query heads unevenly is what a Hugging Face config cannot describe.

The hidden size (the residual stream every layer reads and writes) can be cut
too: it is the only cut that shrinks the embedding and the LM head, often a
large share of a small model's bytes. Its coupling spans the whole model, so
it is written by hand as well (``prune_hidden_``).

Hugging Face configs describe every layer with one number, so every layer
loses the same count of channels and groups (importance decides *which*),
and ``save_pretrained`` / ``from_pretrained`` round-trip the pruned model.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch_pruning as tp
from torch import nn
from tqdm.auto import tqdm

from ._checks import check_int, check_number
from .data import batches
from .models import check_token_ids, context_length, count_parameters
from .quantization import is_quantized
from .roofline import ModelDims
from .training import fit, kd_loss, lr_schedule

log = logging.getLogger(__name__)

# Decoder layouts we know: model.model.layers[i].{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
METHODS = ("structured", "unstructured")
TARGETS = ("mlp", "heads", "both")
SCOPES = ("global", "layer")

# Per decoder layer: (scores of each MLP channel, scores of each KV group).
LayerScores = tuple[torch.Tensor, torch.Tensor]
ImportanceFn = Callable[[nn.Module, "torch.Tensor | None"], list[LayerScores]]


# --- the model's anatomy -----------------------------------------------------------

def check_supported(model: nn.Module) -> None:
    """Raise a ValueError naming the supported families if ``model`` isn't one of them."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"structured pruning supports model types {list(SUPPORTED_MODEL_TYPES)} "
            f"(Llama-style decoder: q/k/v/o_proj attention, gate/up/down_proj MLP); "
            f"got {model_type!r} ({type(model).__name__})"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a supported causal LM."""
    check_supported(model)
    return model.model.layers


def head_dim(model: nn.Module) -> int:
    """Size of one attention head; pruning never changes it."""
    c = model.config
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _mlp_tensors(layer: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """(tensor, axis) pairs whose entries along ``axis`` are the MLP channels."""
    m = layer.mlp
    return [(m.gate_proj.weight, 0), (m.up_proj.weight, 0), (m.down_proj.weight, 1)]


def _head_tensors(layer: nn.Module) -> list[tuple[torch.Tensor, int]]:
    """(tensor, axis) pairs whose entries along ``axis`` are laid out KV group by KV group.

    q rows are head after head, and query head ``h`` uses KV head ``h // groups``,
    so the rows of one KV group are contiguous in q, k, v and in the columns of o.
    """
    a = layer.self_attn
    out = [(a.q_proj.weight, 0), (a.k_proj.weight, 0), (a.v_proj.weight, 0), (a.o_proj.weight, 1)]
    out += [(p.bias, 0) for p in (a.q_proj, a.k_proj, a.v_proj) if p.bias is not None]  # Qwen2
    return out


def _per_block(values: torch.Tensor, axis: int, blocks: int) -> torch.Tensor:
    """Sum a per-element score tensor into ``blocks`` contiguous blocks along ``axis``."""
    v = values.movedim(axis, 0).reshape(blocks, -1)
    return v.float().sum(dim=1)


def _score(layer: nn.Module, per_element: Callable[[torch.Tensor], torch.Tensor],
           n_kv: int) -> LayerScores:
    """Apply a per-weight score and pool it per MLP channel and per KV group."""
    inter = layer.mlp.gate_proj.out_features
    mlp = sum(_per_block(per_element(t), ax, inter) for t, ax in _mlp_tensors(layer))
    heads = sum(_per_block(per_element(t), ax, n_kv) for t, ax in _head_tensors(layer))
    return mlp, heads


# --- importance criteria (pluggable: any callable with this signature works) ------

@torch.no_grad()
def magnitude_importance(model: nn.Module, calibration: torch.Tensor | None = None) -> list[LayerScores]:
    """Squared L2 norm of every weight a channel / KV group owns: small weights matter least."""
    n_kv = model.config.num_key_value_heads
    return [_score(layer, lambda t: t.detach().pow(2), n_kv) for layer in decoder_layers(model)]


def taylor_importance(model: nn.Module, calibration: torch.Tensor | None) -> list[LayerScores]:
    """First-order Taylor estimate |w * dL/dw| of the loss change when a weight is removed.

    Gradients of the language-model loss are accumulated over the calibration
    batch (a (N, T) tensor of token ids), one sequence at a time to bound memory.
    """
    if calibration is None:
        raise ValueError("taylor importance needs calibration token ids (N, T); "
                         "use course_lib.data.calibration_batches(tokenizer)")
    check_token_ids(model, calibration, "calibration")
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters()]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
        p.grad = None
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            for row in calibration:
                x = row.view(1, -1).to(device)
                model(input_ids=x, labels=x).loss.backward()
        n_kv = model.config.num_key_value_heads
        scores = [_score(layer, lambda t: (t.detach() * t.grad).abs(), n_kv)
                  for layer in decoder_layers(model)]
    finally:
        for p, s in zip(params, saved):
            p.grad = None
            p.requires_grad_(s)
        model.train(was_training)
    return scores


@torch.no_grad()
def activation_importance(model: nn.Module, calibration: torch.Tensor | None) -> list[LayerScores]:
    """Wanda-style: mean |input activation| of a channel times the norm of the weights reading it.

    Hooks on ``down_proj`` and ``o_proj`` see the MLP channels and the heads'
    outputs on real calibration text; a channel that is large but never fires
    scores low.
    """
    if calibration is None:
        raise ValueError("activation importance needs calibration token ids (N, T); "
                         "use course_lib.data.calibration_batches(tokenizer)")
    check_token_ids(model, calibration, "calibration")
    layers = decoder_layers(model)
    n_kv = model.config.num_key_value_heads
    sums: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(layers):
        for name, mod in (("mlp", layer.mlp.down_proj), ("attn", layer.self_attn.o_proj)):
            def hook(_m, args, _out, key=(i, name)):
                a = args[0].detach().abs().float().reshape(-1, args[0].shape[-1]).sum(0)
                sums[key] = sums.get(key, 0) + a
            hooks.append(mod.register_forward_hook(hook))
    device = next(model.parameters()).device
    try:
        for row in calibration:
            model(input_ids=row.view(1, -1).to(device))
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, layer in enumerate(layers):
        down, o = layer.mlp.down_proj.weight, layer.self_attn.o_proj.weight
        mlp = sums[(i, "mlp")] * down.float().norm(dim=0)
        heads = (sums[(i, "attn")] * o.float().norm(dim=0)).reshape(n_kv, -1).sum(1)
        out.append((mlp, heads))
    return out


IMPORTANCE: dict[str, ImportanceFn] = {
    "magnitude": magnitude_importance,
    "taylor": taylor_importance,
    "activation": activation_importance,
}
NEEDS_CALIBRATION = ("taylor", "activation")


# --- the configuration ------------------------------------------------------------------

@dataclass(frozen=True)
class PruneConfig:
    """What to remove and how to choose it.

    ``ratio`` is the fraction removed: of the weights (unstructured) or of the
    MLP channels (structured). ``head_ratio`` is the fraction of KV groups
    (a KV head with its query heads) removed; ``None`` follows ``ratio``,
    rounded down to whole groups (possibly none). ``query_ratio`` is the
    fraction of query heads removed *inside* every KV group (the same number
    from each, rounded down; chosen by the squared norm of each head's q_proj
    rows and o_proj columns): the KV heads stay, so the K/V cache does not
    shrink, but q_proj and o_proj do. ``round_to`` keeps the MLP
    width a multiple of that many channels (kernels like multiples of 8).
    ``hidden_ratio`` is the fraction of the model's hidden size (the residual
    stream) removed: every matrix loses rows or columns, the embedding and the
    LM head included, so it is the one cut that also shrinks the vocabulary
    matrices. Channels are chosen by weight magnitude, whatever ``importance``
    says (that ranks MLP channels and KV groups); the width is rounded so the
    config still accepts it (a multiple of the query-head count, and of
    ``round_to``).
    """

    ratio: float = 0.3
    method: str = "structured"
    target: str = "both"
    head_ratio: float | None = None
    importance: str | ImportanceFn = "magnitude"
    scope: str = "global"  # unstructured only: one threshold for all layers, or one per matrix
    round_to: int = 1
    hidden_ratio: float = 0.0
    query_ratio: float = 0.0

    def __post_init__(self):
        for name in ("ratio", "head_ratio", "hidden_ratio", "query_ratio"):
            v = getattr(self, name)
            if name == "head_ratio" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ValueError(f"{name} must be a number in [0, 1) (the fraction removed; "
                                 f"1 would remove everything), got {v!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if isinstance(self.importance, str) and self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {sorted(IMPORTANCE)} or a callable "
                             f"(model, calibration) -> [(mlp_scores, group_scores), ...]; "
                             f"got {self.importance!r}")
        if not isinstance(self.importance, str) and not callable(self.importance):
            raise ValueError(f"importance must be a name in {sorted(IMPORTANCE)} or a callable")
        if isinstance(self.round_to, bool) or not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be a positive int (1 = no rounding), got {self.round_to!r}")
        if self.method == "unstructured" and (self.target != "both" or self.head_ratio is not None
                                              or self.hidden_ratio or self.query_ratio):
            raise ValueError("target, head_ratio, query_ratio and hidden_ratio apply to method='structured' only; "
                             "unstructured pruning zeroes single weights everywhere")

    def importance_fn(self) -> ImportanceFn:
        """The importance callable this config names."""
        return IMPORTANCE[self.importance] if isinstance(self.importance, str) else self.importance


@dataclass(frozen=True)
class PrunePlan:
    """How many channels / KV groups each layer keeps (the same in every layer)."""

    mlp_keep: int
    mlp_total: int
    groups_keep: int
    groups_total: int
    hidden_keep: int | None = None  # None: the hidden size is left alone
    hidden_total: int | None = None
    queries_keep: int | None = None  # query heads kept per KV group; None: all of them
    queries_total: int | None = None


def plan(model: nn.Module, cfg: PruneConfig) -> PrunePlan:
    """Turn ratios into whole channels and KV groups, or raise if that can't be done."""
    c = model.config
    inter, n_kv = c.intermediate_size, c.num_key_value_heads
    mlp_keep = inter
    if cfg.target in ("mlp", "both") and cfg.ratio > 0:
        if cfg.round_to > inter:
            raise ValueError(f"round_to={cfg.round_to} exceeds the MLP width {inter}; use a smaller round_to")
        mlp_keep = inter - math.floor(cfg.ratio * inter)
        mlp_keep = min(inter, math.ceil(mlp_keep / cfg.round_to) * cfg.round_to)
        if mlp_keep == inter:
            raise ValueError(f"ratio={cfg.ratio} of {inter} MLP channels rounded to multiples of "
                             f"{cfg.round_to} removes nothing; raise ratio or lower round_to")
    groups_keep = n_kv
    if cfg.target in ("heads", "both"):
        hr = cfg.ratio if cfg.head_ratio is None else cfg.head_ratio
        want = n_kv - math.floor(hr * n_kv + 1e-9)
        valid = [k for k in range(1, n_kv) if _config_accepts(model, k)]
        allowed = [round(1 - k / n_kv, 4) for k in sorted(valid, reverse=True)]
        explicit = cfg.head_ratio is not None or cfg.target == "heads"
        if explicit and want not in valid:
            raise ValueError(
                f"head ratio {hr} of {n_kv} KV group(s) can't be met: grouped-query attention removes a KV "
                f"head with its {c.num_attention_heads // n_kv} query heads, and the {c.model_type} config "
                f"must still accept the head count; allowed head ratios here: "
                f"{allowed or 'none - this model has a single KV group'}; or use target='mlp'")
        if not explicit:  # following ratio: prune at most that much, never more
            groups_keep = min([k for k in valid if k >= want], default=n_kv)
            if groups_keep != want:
                log.info("head ratio %.2f -> keeping %d of %d KV groups", hr, groups_keep, n_kv)
        else:
            groups_keep = want
    qpk = c.num_attention_heads // n_kv
    queries_keep = None
    if cfg.query_ratio > 0:
        queries_keep = qpk - math.floor(cfg.query_ratio * qpk + 1e-9)
        valid_q = [k for k in range(1, qpk) if _config_accepts(model, groups_keep, k)]
        if queries_keep not in valid_q:
            allowed = [round(1 - k / qpk, 4) for k in sorted(valid_q, reverse=True)]
            raise ValueError(
                f"query_ratio {cfg.query_ratio} can't be met: every KV group has {qpk} query head(s) and loses "
                f"the same whole number of them (here {qpk - queries_keep}), and the {c.model_type} config must "
                f"still accept the head count; allowed query ratios here: "
                f"{allowed or 'none - each KV group has a single query head'}; or use head_ratio")
    hidden_keep = None
    if cfg.hidden_ratio > 0:
        hidden = c.hidden_size
        heads_after = groups_keep * (queries_keep or qpk)
        step = math.lcm(heads_after, cfg.round_to)  # Llama/Qwen2 configs want hidden % heads == 0
        hidden_keep = math.ceil((hidden - math.floor(cfg.hidden_ratio * hidden)) / step) * step
        if hidden_keep >= hidden:
            raise ValueError(f"hidden_ratio={cfg.hidden_ratio} of hidden size {hidden}, rounded to multiples of "
                             f"{step} ({heads_after} query heads x round_to {cfg.round_to}), removes nothing; "
                             "raise hidden_ratio")
    return PrunePlan(mlp_keep, inter, groups_keep, n_kv, hidden_keep, c.hidden_size if hidden_keep else None,
                     queries_keep, qpk if queries_keep else None)


def _config_accepts(model: nn.Module, groups_keep: int, queries_keep: int | None = None) -> bool:
    """Would the model's config class accept this many KV groups (e.g. Llama wants hidden % heads == 0)?"""
    c = copy.deepcopy(model.config)
    c.num_attention_heads = groups_keep * (queries_keep or c.num_attention_heads // c.num_key_value_heads)
    c.num_key_value_heads = groups_keep
    try:
        if hasattr(c, "validate_architecture"):
            c.validate_architecture()
    except ValueError:
        return False
    return True


# --- structured surgery -------------------------------------------------------------------

def mlp_dependency_group(layer: nn.Module, idxs: Sequence[int]):
    """Torch-Pruning's group for removing MLP channels ``idxs``: what is coupled, and how.

    The graph is traced on the MLP alone (cheap, and it stays clear of the
    attention ops that make Torch-Pruning loop forever). ``print(group)`` shows
    gate_proj out -> SiLU -> * up_proj out -> down_proj in.
    """
    mlp = layer.mlp
    w = mlp.gate_proj.weight
    example = torch.zeros(1, 2, mlp.gate_proj.in_features, dtype=w.dtype, device=w.device)
    with torch.enable_grad():  # the graph is traced through autograd
        dg = tp.DependencyGraph().build_dependency(mlp, example_inputs=example)
    return dg.get_pruning_group(mlp.gate_proj, tp.prune_linear_out_channels, idxs=list(idxs))


def prune_mlp_channels_(layer: nn.Module, remove: Sequence[int]) -> None:
    """Delete MLP channels ``remove`` from one decoder layer, via the dependency group."""
    if len(remove) == 0:
        return
    if len(remove) >= layer.mlp.gate_proj.out_features:
        raise ValueError("cannot remove every MLP channel of a layer")
    mlp_dependency_group(layer, remove).prune()
    layer.mlp.intermediate_size = layer.mlp.gate_proj.out_features


def prune_kv_groups_(layer: nn.Module, remove: Sequence[int], n_kv: int, head_dim_: int) -> None:
    """Delete whole KV groups (a KV head and the query heads sharing it) from one layer.

    The coupling, written down: q_proj rows, k_proj and v_proj rows (and their
    biases) are outputs; o_proj columns are inputs. Torch-Pruning's pruning
    functions cut each one (they also cut the biases).
    """
    if len(remove) == 0:
        return
    if len(remove) >= n_kv:
        raise ValueError(f"cannot remove all {n_kv} KV groups of a layer")
    a = layer.self_attn
    q_per_group = a.num_key_value_groups * head_dim_
    q_idx = [g * q_per_group + i for g in remove for i in range(q_per_group)]
    kv_idx = [g * head_dim_ + i for g in remove for i in range(head_dim_)]
    tp.prune_linear_out_channels(a.q_proj, q_idx)
    tp.prune_linear_out_channels(a.k_proj, kv_idx)
    tp.prune_linear_out_channels(a.v_proj, kv_idx)
    tp.prune_linear_in_channels(a.o_proj, q_idx)


def query_head_scores(layer: nn.Module, head_dim_: int) -> torch.Tensor:
    """Squared norm of each query head's weights: its q_proj rows (and bias) and its o_proj columns."""
    a = layer.self_attn
    n_heads = a.q_proj.out_features // head_dim_
    score = _per_block(a.q_proj.weight.detach().pow(2), 0, n_heads) + _per_block(
        a.o_proj.weight.detach().pow(2), 1, n_heads)
    if a.q_proj.bias is not None:
        score += _per_block(a.q_proj.bias.detach().pow(2), 0, n_heads)
    return score


def prune_query_heads_(layer: nn.Module, remove: Sequence[int], head_dim_: int) -> None:
    """Delete query heads ``remove`` (indices into this layer's query heads), the same count from every KV group.

    The KV heads stay; each is then shared by ``num_key_value_groups - len(remove) / n_kv`` query heads, which
    is still grouped-query attention. Uneven removal would give KV heads different numbers of readers, which
    the attention code (one ``repeat_kv`` factor) and a Hugging Face config cannot express: refused.
    """
    if len(remove) == 0:
        return
    a = layer.self_attn
    qpk = a.num_key_value_groups
    n_heads = a.q_proj.out_features // head_dim_
    n_kv = n_heads // qpk
    per_group = [0] * n_kv
    for h in set(int(h) for h in remove):
        if not 0 <= h < n_heads:
            raise ValueError(f"query head {h} does not exist: this layer has heads 0..{n_heads - 1}")
        per_group[h // qpk] += 1
    if len(set(per_group)) != 1 or per_group[0] >= qpk:
        raise ValueError(f"remove the same number of query heads (fewer than {qpk}) from every one of the {n_kv} "
                         f"KV groups; got {per_group} per group")
    q_idx = [h * head_dim_ + i for h in sorted(set(int(h) for h in remove)) for i in range(head_dim_)]
    tp.prune_linear_out_channels(a.q_proj, q_idx)
    tp.prune_linear_in_channels(a.o_proj, q_idx)
    a.num_key_value_groups = qpk - per_group[0]  # repeat_kv's factor: query heads per KV head


@torch.no_grad()
def hidden_importance(model: nn.Module) -> torch.Tensor:
    """Squared L2 norm of every weight that reads or writes each hidden channel (the residual stream).

    The embedding's column, the LM head's column (when it is not tied), every q/k/v/gate/up column and every
    o/down row of that channel: a channel whose weights are all small carries little. Columns that read the
    stream through an RMSNorm are weighted by that norm's gain, since the gain scales what they read.
    """
    def sq(w: torch.Tensor, dim: int) -> torch.Tensor:  # no float32 copy of a whole embedding matrix
        return torch.linalg.vector_norm(w.detach(), dim=dim, dtype=torch.float32).pow(2)

    emb = model.get_input_embeddings().weight
    score = sq(emb, 0)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb:
        score += sq(head.weight, 0) * model.model.norm.weight.detach().float().pow(2)
    for layer in decoder_layers(model):
        a, m = layer.self_attn, layer.mlp
        g_attn = layer.input_layernorm.weight.detach().float().pow(2)
        g_mlp = layer.post_attention_layernorm.weight.detach().float().pow(2)
        for lin, g in ((a.q_proj, g_attn), (a.k_proj, g_attn), (a.v_proj, g_attn), (m.gate_proj, g_mlp),
                       (m.up_proj, g_mlp)):
            score += sq(lin.weight, 0) * g
        for lin in (a.o_proj, m.down_proj):
            score += sq(lin.weight, 1)
    return score


def _keep_rows(t: torch.Tensor, keep: torch.Tensor, axis: int, scale: float = 1.0) -> nn.Parameter:
    kept = t.detach().index_select(axis, keep.to(t.device)) * scale
    return nn.Parameter(kept.contiguous(), requires_grad=t.requires_grad)


@torch.no_grad()
def prune_hidden_(model: nn.Module, keep: Sequence[int]) -> None:
    """Keep only hidden channels ``keep`` everywhere: embedding, every norm, every projection, the LM head.

    RMSNorm then averages over fewer channels: with the removed channels silent, the mean square grows by
    ``total / kept``, so every norm's gain is scaled by ``sqrt(total / kept)`` and its epsilon by
    ``total / kept``, which gives exactly the same outputs. With channels that were small rather than zero this is
    the best single correction; recovery training does the rest. The config (hidden size, head size, norm
    epsilon) is updated too, so the model saves and reloads.
    """
    check_supported(model)
    total = model.get_input_embeddings().weight.shape[1]
    keep_list = sorted(int(k) for k in keep)
    if len(set(keep_list)) != len(keep_list) or not 0 < len(keep_list) < total or keep_list[0] < 0 \
            or keep_list[-1] >= total:
        raise ValueError(f"keep must list between 1 and {total - 1} distinct channels in [0, {total}), "
                         f"got {len(keep_list)} entries ({len(set(keep_list))} distinct)")
    keep_t = torch.as_tensor(keep_list, dtype=torch.long)
    ratio = total / len(keep_list)
    c = model.config
    c.head_dim = head_dim(model)  # pin it before hidden_size changes: the default hidden // heads would be wrong
    c.hidden_size = len(keep_list)
    c.rms_norm_eps = c.rms_norm_eps * ratio
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is emb.weight
    emb.weight = _keep_rows(emb.weight, keep_t, 1)
    emb.embedding_dim = len(keep_t)
    if head is not None:
        head.weight = emb.weight if tied else _keep_rows(head.weight, keep_t, 1)
        head.in_features = len(keep_t)
    norms = [model.model.norm]
    for layer in decoder_layers(model):
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):  # read the residual stream
            lin.weight = _keep_rows(lin.weight, keep_t, 1)
            lin.in_features = len(keep_t)
        for lin in (a.o_proj, m.down_proj):  # write into it
            lin.weight = _keep_rows(lin.weight, keep_t, 0)
            if lin.bias is not None:
                lin.bias = _keep_rows(lin.bias, keep_t, 0)
            lin.out_features = len(keep_t)
    for norm in norms:
        norm.weight = _keep_rows(norm.weight, keep_t, 0, scale=math.sqrt(ratio))
        norm.variance_epsilon = norm.variance_epsilon * ratio


def _lowest(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``len(scores) - keep`` lowest scores, sorted."""
    n_remove = scores.numel() - keep
    if n_remove <= 0:
        return []
    return sorted(torch.argsort(scores.float(), stable=True)[:n_remove].tolist())


@dataclass(frozen=True)
class PruneReport:
    """What a pruning call did (numbers measured on the model afterwards)."""

    method: str
    params_before: int
    params_after: int
    sparsity: float  # fraction of zeros in the decoder's Linear weights
    plan: PrunePlan | None = None
    # layer -> {"mlp": [...], "groups": [...], "queries": [...] with query_ratio (original head numbers)};
    # and "hidden" -> [...] when the hidden size was cut
    removed: dict = field(default_factory=dict, repr=False)
    seconds: float = 0.0


def prune_(model: nn.Module, cfg: PruneConfig, calibration: torch.Tensor | None = None) -> PruneReport:
    """Prune ``model`` in place as ``cfg`` says; return a report. Use :func:`pruned` to keep the original.

    ``calibration`` is a (N, T) tensor of token ids, needed by the ``taylor``
    and ``activation`` importances.
    """
    if not isinstance(cfg, PruneConfig):
        raise ValueError(f"cfg must be a PruneConfig, got {type(cfg).__name__}")
    if is_quantized(model):
        raise ValueError("prune_ needs a float model, and this one is quantized (packed int8/int4 layers): "
                         "prune the float model first, then quantize it (prune_(model, cfg); quantize_(model, qcfg))")
    check_supported(model)
    if calibration is not None:  # a custom importance function gets checked ids too
        check_token_ids(model, calibration, "calibration")
    t0 = time.perf_counter()
    before = count_parameters(model)
    if cfg.method == "unstructured":
        magnitude_prune_unstructured_(model, cfg.ratio, cfg.scope)
        return PruneReport("unstructured", before, count_parameters(model), sparsity(model),
                           seconds=time.perf_counter() - t0)
    p = plan(model, cfg)
    if isinstance(cfg.importance, str) and cfg.importance in NEEDS_CALIBRATION and calibration is None:
        raise ValueError(f"importance {cfg.importance!r} needs calibration token ids; pass "
                         "calibration=course_lib.data.calibration_batches(tokenizer) or use 'magnitude'")
    scores = cfg.importance_fn()(model, calibration)
    layers = decoder_layers(model)
    if len(scores) != len(layers):
        raise ValueError(f"importance returned {len(scores)} layer scores for {len(layers)} layers")
    hd = head_dim(model)
    removed = {}
    with torch.no_grad():
        for i, (layer, (mlp_s, grp_s)) in enumerate(zip(layers, scores)):
            mlp_rm, grp_rm = _lowest(mlp_s, p.mlp_keep), _lowest(grp_s, p.groups_keep)
            prune_mlp_channels_(layer, mlp_rm)
            prune_kv_groups_(layer, grp_rm, p.groups_total, hd)
            removed[i] = {"mlp": mlp_rm, "groups": grp_rm}
            if p.queries_keep:  # inside each kept KV group, its weakest query heads (indices after the cut above)
                q_s = query_head_scores(layer, hd).view(p.groups_keep, p.queries_total)
                q_rm = [g * p.queries_total + j for g in range(p.groups_keep) for j in _lowest(q_s[g], p.queries_keep)]
                prune_query_heads_(layer, q_rm, hd)
                kept = [g for g in range(p.groups_total) if g not in grp_rm]  # report original head numbers
                removed[i]["queries"] = [kept[h // p.queries_total] * p.queries_total + h % p.queries_total
                                         for h in q_rm]
        if p.hidden_keep:
            scores_h = hidden_importance(model)
            gone = _lowest(scores_h, p.hidden_keep)
            prune_hidden_(model, sorted(set(range(p.hidden_total)) - set(gone)))
            removed["hidden"] = gone
    _update_config(model, p, hd)
    return PruneReport("structured", before, count_parameters(model), sparsity(model), p, removed,
                       time.perf_counter() - t0)


def _update_config(model: nn.Module, p: PrunePlan, hd: int) -> None:
    """Make the HF config describe the new shapes, so save/load round-trips."""
    c = model.config
    groups = p.queries_keep or c.num_attention_heads // c.num_key_value_heads
    c.head_dim = hd  # pin it: the default hidden_size // num_attention_heads would now be wrong
    c.intermediate_size = p.mlp_keep
    c.num_key_value_heads = p.groups_keep
    c.num_attention_heads = p.groups_keep * groups  # (prune_hidden_ sets hidden_size itself)


def pruned(model: nn.Module, cfg: PruneConfig, calibration: torch.Tensor | None = None
           ) -> tuple[nn.Module, PruneReport]:
    """A pruned *copy* of ``model`` (the original is untouched) and the report."""
    clone = copy.deepcopy(model)
    report = prune_(clone, cfg, calibration)
    return clone, report


# --- unstructured ---------------------------------------------------------------------------

def _decoder_linears(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers inside the decoder blocks (embeddings and lm_head are left alone)."""
    return [m for m in decoder_layers(model).modules() if isinstance(m, nn.Linear)]


@torch.no_grad()
def magnitude_prune_unstructured_(model: nn.Module, sparsity_: float, scope: str = "global") -> float:
    """Zero the smallest-magnitude weights of the decoder's Linear layers; return measured sparsity.

    ``scope="global"`` uses one threshold for the whole model (layers with
    small weights lose more); ``"layer"`` zeroes the same fraction of every matrix.
    """
    if not 0 <= sparsity_ < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity_!r}")
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    linears = _decoder_linears(model)
    if sparsity_ == 0:
        return sparsity(model)
    if scope == "global":
        # kthvalue over every weight at once; a float32 copy of the magnitudes is the only extra memory.
        flat = torch.cat([m.weight.detach().abs().float().flatten() for m in linears])
        k = max(1, int(sparsity_ * flat.numel()))
        threshold = flat.kthvalue(k).values
        del flat
        for m in linears:
            m.weight.masked_fill_(m.weight.abs().float() <= threshold, 0)
    else:
        for m in linears:
            w = m.weight
            k = max(1, int(sparsity_ * w.numel()))
            threshold = w.abs().float().flatten().kthvalue(k).values
            w.masked_fill_(w.abs().float() <= threshold, 0)
    return sparsity(model)


def sparsity(model: nn.Module) -> float:
    """Measured fraction of exact zeros in the decoder's Linear weights."""
    zeros = total = 0
    for m in _decoder_linears(model):
        zeros += int((m.weight == 0).sum())
        total += m.weight.numel()
    return zeros / max(1, total)


def speedup_ceiling(dense: nn.Module, small: nn.Module) -> float:
    """The decode speed-up ``small`` would get over ``dense`` if a step cost only its weight bytes.

    Decode reads every weight once per token (the embedding: one row), so the ratio of weights read per step is
    what a memory-bound loop can gain at most. Counted from the two configs (blocks, norms, LM head): a model
    full of zeros but the same shapes has ceiling 1, and the embedding/LM head that MLP and head cuts never touch
    keep it well under 1 / (1 - ratio).
    """
    return ModelDims.from_config(dense.config).decode_params / ModelDims.from_config(small.config).decode_params


# --- sensitivity -------------------------------------------------------------------------------

def sensitivity_scan(model: nn.Module, evaluate: Callable[[nn.Module], float], ratio: float = 0.5,
                     target: str = "mlp", importance: str | ImportanceFn = "magnitude",
                     calibration: torch.Tensor | None = None, layers: Sequence[int] | None = None) -> list[float]:
    """Prune one layer at a time (on a copy) and return ``evaluate(copy)`` for each layer.

    ``evaluate`` is typically held-out perplexity. A layer whose score jumps is
    sensitive and should be pruned less. The copies have layers of different
    widths, which a HF config cannot describe: they are for measuring only.
    ``layers``: scan only these decoder layers (default: all), one value each, in that order.
    """
    cfg = PruneConfig(ratio=ratio, target=target, importance=importance)
    n = len(decoder_layers(model))
    which = list(range(n)) if layers is None else list(layers)
    if not which or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n for i in which):
        raise ValueError(f"layers must be a non-empty list of decoder layer indices in 0..{n - 1}, got {layers!r}")
    p = plan(model, cfg)
    scores = cfg.importance_fn()(model, calibration)
    hd = head_dim(model)
    out = []
    for i in tqdm(which, desc="sensitivity", leave=False):
        clone = copy.deepcopy(model)
        layer = decoder_layers(clone)[i]
        with torch.no_grad():
            prune_mlp_channels_(layer, _lowest(scores[i][0], p.mlp_keep))
            prune_kv_groups_(layer, _lowest(scores[i][1], p.groups_keep), p.groups_total, hd)
        out.append(float(evaluate(clone)))
        del clone
    return out


# --- recovery ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RecoveryConfig:
    """A short fine-tune that lets the remaining weights take over the pruned ones' work.

    With ``distill_alpha > 0`` the loss mixes in KL divergence to the unpruned
    teacher's next-token distribution (temperature ``temperature``): the teacher
    says how likely every token was, not just which one came next.
    """

    steps: int = 200
    lr: float = 1e-3
    batch_size: int = 8
    seq_len: int = 128
    distill_alpha: float = 0.0
    temperature: float = 2.0
    max_seconds: float | None = 600.0  # stop early when the time budget is spent
    eval_every: int = 0  # 0: no evaluation during training
    seed: int = 0

    def __post_init__(self):
        # Every numeric field is checked: a bool counts as an int in Python (distill_alpha=True is pure KD,
        # not a slip caught), and NaN/inf pass a plain "> 0" or slip through the loss and ruin every weight.
        for name in ("steps", "batch_size", "seq_len"):
            check_int(name, getattr(self, name), 1)
        check_int("eval_every", self.eval_every, 0, " (0 = no evaluation during training)")
        check_int("seed", self.seed, 0)
        check_number("lr", self.lr, "in (0, 1) (try 1e-3)", lambda v: 0 < v < 1)
        check_number("distill_alpha", self.distill_alpha, "in [0, 1] (0 = plain fine-tune, 1 = pure distillation)",
                     lambda v: 0 <= v <= 1)
        check_number("temperature", self.temperature, "> 0 and finite (typical: 1-4)", lambda v: 0 < v < math.inf)
        if self.max_seconds is not None:
            check_number("max_seconds", self.max_seconds, "> 0 or None (None or inf = no time limit)",
                         lambda v: v > 0)

    def lr_at(self, step: int) -> float:
        """10 steps of warm-up, then a straight line towards 0 from the first step
        (:func:`course_lib.training.lr_schedule`, ``decay="linear"``)."""
        return lr_schedule(step, self.lr, self.steps, warmup_steps=10, decay="linear")


@dataclass(frozen=True)
class RecoveryLog:
    """The recovery curve: training loss per step, and evaluations along the way."""

    losses: tuple[float, ...]
    evals: tuple[tuple[int, float], ...]  # (step, evaluate(model))
    seconds: float
    steps_done: int


def recover_(model: nn.Module, train_ids: torch.Tensor, cfg: RecoveryConfig = RecoveryConfig(),
             teacher: nn.Module | None = None,
             evaluate: Callable[[nn.Module], float] | None = None) -> RecoveryLog:
    """Fine-tune ``model`` in place on windows of ``train_ids`` (1-D token ids); return the curve.

    ``teacher`` (used when ``cfg.distill_alpha > 0``) is the unpruned model.
    ``evaluate(model)`` (e.g. held-out perplexity) runs at step 0, every
    ``cfg.eval_every`` steps and at the end.
    """
    if cfg.distill_alpha > 0 and teacher is None:
        raise ValueError("distill_alpha > 0 needs teacher= (the unpruned model)")
    if cfg.distill_alpha == 0 and teacher is not None:  # a teacher the loss never reads is a recipe gone wrong
        raise ValueError("teacher= is only used with RecoveryConfig(distill_alpha > 0); with distill_alpha=0 the "
                         "fine-tune is plain cross-entropy. Set distill_alpha (e.g. 0.5) to distil from the "
                         "teacher, or drop teacher=")
    for m, name in ((model, "model"), (teacher, "teacher")):
        if m is None or (name == "teacher" and cfg.distill_alpha == 0):
            continue
        check_token_ids(m, train_ids, "train_ids")
        n = context_length(m)
        if n is not None and cfg.seq_len > n:
            raise ValueError(f"cfg.seq_len ({cfg.seq_len}) exceeds the {name}'s context of {n} tokens "
                             f"(config.max_position_embeddings): use RecoveryConfig(seq_len=...) <= {n}")
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    evals = []
    if evaluate is not None:
        evals.append((0, float(evaluate(model))))

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=x).logits
        if cfg.distill_alpha == 0:
            logits = logits.float()
            return nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        with torch.no_grad():
            t_logits = teacher(input_ids=x).logits
        return kd_loss(logits, t_logits, y, cfg.temperature, cfg.distill_alpha)

    def on_step(done: int, loss: float) -> None:
        if evaluate is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
            model.eval()  # fit puts it back in training mode before the next step
            evals.append((done, float(evaluate(model))))

    t0 = time.perf_counter()
    run = fit(model, batches(train_ids.flatten(), cfg.seq_len, cfg.batch_size, g), loss_fn, opt, cfg.steps, cfg.lr_at,
              on_step=on_step, max_seconds=cfg.max_seconds, desc="recovery", leave=False, postfix_every=1)
    if evaluate is not None:
        evals.append((run.steps_done, float(evaluate(model))))
    return RecoveryLog(run.losses, tuple(evals), time.perf_counter() - t0, run.steps_done)
