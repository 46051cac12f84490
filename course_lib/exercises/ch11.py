"""Exercises of notebook 11 (tools and trends): pick the tool, read a side-by-side table, build the harness.

11.1 and 11.2 are answers (a choice, a reading of the measured table); 11.3 to 11.5 are functions the
learner writes: the interleaved timing loop every comparison in the course runs on, the matched-prefix
count that says whether a faster variant still answers the same, and the number of distinct experts a batch of
tokens reads from a mixture-of-experts layer.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Callable

import torch

from ..metrics import matched_prefix
from ..roofline import expected_experts
from . import Feedback, attempt, checked, fail, not_done, ok

UNANSWERED = ("", "?", None)

# Scenario -> the tools that fit it best, and why (used for the feedback).
SCENARIOS = {
    "a chat service with hundreds of concurrent users on NVIDIA GPUs": (
        {"vLLM", "TensorRT-LLM"}, "it needs continuous batching and a paged KV cache (notebook 10's lesson)"),
    "an offline assistant on a laptop CPU, no Python allowed in the product": (
        {"llama.cpp"}, "a C/C++ runtime with low-bit GGUF weights runs anywhere without Python"),
    "one exported model shipped to a C# desktop app and a phone": (
        {"ONNX Runtime"}, "one ONNX graph, many language bindings and execution providers"),
    "fit a 70B model into one GPU's memory to fine-tune it with QLoRA": (
        {"bitsandbytes"}, "NF4 4-bit storage is about memory, not speed"),
}


def _tool_key(name) -> str:
    """A tool name compared without case, spaces or punctuation: "vllm", "llama-cpp" and "onnxruntime" count."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def check_tool_choice(answers: dict) -> Feedback:
    """``answers`` maps each scenario of :data:`SCENARIOS` to a tool name (any case or punctuation)."""
    if not isinstance(answers, dict):
        return fail("answers must be a dict {scenario: tool name}")
    if all(answers.get(s) in UNANSWERED for s in SCENARIOS):
        return not_done("a tool name for each scenario")
    missing = [s for s in SCENARIOS if answers.get(s) in UNANSWERED]
    if missing:
        return fail(f"answer every scenario; missing: {missing[0]!r}")
    for scenario, (good, why) in SCENARIOS.items():
        if _tool_key(answers[scenario]) not in {_tool_key(g) for g in good}:
            return fail(f"{scenario!r}: not {answers[scenario]!r} - {why}; think of {' or '.join(sorted(good))}.")
    return ok("Correct: the workload picks the tool, not the other way round.")


def check_fastest_correct(answer: str, rows: list[dict], seq_len: int, tol: float = 1e-3) -> Feedback:
    """The fastest tool at ``seq_len`` *among those whose logits match fp32 within* ``tol``."""
    if answer in UNANSWERED:
        return not_done("`my_tool` (a tool name from the table)")
    measured = [r for r in rows if r["seq_len"] == seq_len and r.get("ms")]
    if not measured:
        return fail(f"no measured rows at seq_len={seq_len}")
    exact = [r for r in measured if r["max_abs_diff"] <= tol]
    want = min(exact, key=lambda r: r["ms"])["tool"]
    fastest = min(measured, key=lambda r: r["ms"])["tool"]
    if answer == want:
        return ok(f"Correct: {want}.")
    if answer == fastest and fastest != want:
        return fail(f"{fastest} is fastest, but its logits differ from fp32 by more than {tol}: it changes the "
                    "answer (quantization). Among exact tools, which is fastest?")
    if answer not in {r["tool"] for r in measured}:
        return fail(f"{answer!r} has no measured row; choose from {[r['tool'] for r in measured]}.")
    return fail("Sort the exact rows (max_abs_diff within the tolerance) by ms.")


# --- 11.3 the interleaved timing loop -----------------------------------------------------------------------


class _DriftingMachine:
    """A fake clock and fake functions: each call costs its base time x the machine's load, which rises as the
    run goes on (another job starting, a clock slowing down). Records the order of the calls."""

    def __init__(self, base: dict[str, float], total_calls: int, drift: float = 1.0):
        self.now = 0.0
        self.base = base
        self.calls: list[str] = []
        self.total = total_calls
        self.drift = drift

    def clock(self) -> float:
        return self.now

    def fn(self, name: str) -> Callable[[], None]:
        def run() -> None:
            load = 1.0 + self.drift * min(1.0, len(self.calls) / self.total)  # 1x at the start, 2x at the end
            self.calls.append(name)
            self.now += self.base[name] * load
        return run


@checked
def check_interleaved(fn: Callable) -> Feedback:
    """The learner's ``fn(fns, rounds, clock) -> {name: [seconds per call, one per round]}``, timed interleaved.

    Run on a fake machine that slows down during the run: timed one function after another, the later one looks
    slower than it is; interleaved, the ratio of medians is the true one.
    """
    rng = random.Random(11)
    for _ in range(4):
        names = [f"f{i}" for i in range(rng.randint(2, 4))]
        rounds = rng.randint(3, 7)
        base = {n: rng.uniform(0.01, 0.05) for n in names}
        machine = _DriftingMachine(base, total_calls=len(names) * (rounds + 1))
        got = attempt(fn, {n: machine.fn(n) for n in names}, rounds, machine.clock, what="`my_compare`")
        if not isinstance(got, dict) or set(got) != set(names):
            return fail(f"return a dict with one entry per function name {names}, got "
                        f"{sorted(got) if isinstance(got, dict) else type(got).__name__}")
        counts = {n: len(got[n]) if isinstance(got[n], (list, tuple)) else None for n in names}
        if any(c != rounds for c in counts.values()):
            return fail(f"each name needs one sample per round ({rounds} rounds), got {counts}")
        calls = machine.calls
        if not calls:
            return fail("the functions were never called: call each fns[name]() between two clock() readings")
        timed = calls[-rounds * len(names):]  # a warm-up before the rounds is allowed
        windows = [set(timed[r * len(names):(r + 1) * len(names)]) for r in range(rounds)]
        if any(w != set(names) for w in windows):
            if timed[:rounds] == [names[0]] * rounds:
                return fail("you timed all rounds of one function, then the next: sequential. A slowdown during "
                            "the run then lands on the later function only. Interleave: in each round, call "
                            "every function once.")
            return fail(f"the calls were not interleaved (order seen: {timed}); each round calls every function once")
        samples = [t for n in names for t in got[n]]
        if not all(isinstance(t, (int, float)) and t > 0 for t in samples):
            return fail("every sample must be a positive number of seconds: clock() after the call minus before")
        if min(samples) > 0.5:  # the fake calls take 10-100 ms of the fake clock
            return fail("your samples look like milliseconds (or a clock reading, not a difference): return "
                        "seconds, clock() after the call minus clock() just before it")
        if max(samples) < 1e-3:
            return fail("your samples are microseconds: time with the `clock` argument, not your own timer "
                        "(the check's functions only advance that clock)")
        true_ratio = base[names[1]] / base[names[0]]
        ratio = statistics.median(got[names[1]]) / statistics.median(got[names[0]])
        if abs(ratio / true_ratio - 1) > 0.15:
            return fail(f"the ratio of your medians is {ratio:.2f}, the true one {true_ratio:.2f}: is each sample "
                        "exactly clock() after the call minus clock() just before it?")
    return ok("Correct: interleaved rounds put the machine's drift on every function alike, so ratios hold - "
              "this is course_lib.timing.compare.")


# --- 11.4 do two variants still answer the same? ------------------------------------------------------------


def _agreement_cases(rng: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cases = []
    for p, n in ((5, 8), (7, 12), (3, 16)):
        ref = torch.randint(0, 50, (p, n), generator=rng)
        got = ref.clone()
        for row in range(p):
            cut = int(torch.randint(0, n + 1, (1,), generator=rng))  # n: the whole answer matches
            if cut < n:
                got[row, cut] = (ref[row, cut] + 1) % 50  # the first difference
                tail = torch.rand(n - cut - 1, generator=rng) < 0.5  # after it, some tokens agree again by luck
                got[row, cut + 1:] = torch.where(tail, ref[row, cut + 1:], (ref[row, cut + 1:] + 2) % 50)
        cases.append((ref, got))
    return cases


@checked
def check_matched_prefix(fn: Callable) -> Feedback:
    """The learner's ``fn(reference, answers) -> (P,) tensor``: leading tokens equal, per prompt."""
    for ref, got in _agreement_cases(torch.Generator().manual_seed(11)):
        want = matched_prefix(ref, got)
        out = attempt(fn, ref.clone(), got.clone(), what="`my_matched_prefix`")
        out = torch.as_tensor(out)
        if out.shape != want.shape:
            return fail(f"one count per prompt (row): expected shape {tuple(want.shape)}, got {tuple(out.shape)} - "
                        "count along the token axis (dim 1)")
        if torch.equal(out.long(), want):
            continue
        if torch.equal(out.long(), (ref == got).sum(1)):
            return fail("you counted every position that matches; stop at the first difference - after it the "
                        "answer continues from another context, so later matches are luck")
        if torch.allclose(out.double(), want.double() / ref.shape[1]):
            return fail("that is the fraction of the answer; return the count of matching leading tokens")
        if torch.equal(out.long(), want + 1) or torch.equal(out.long(), (want - 1).clamp(min=0)):
            return fail("off by one: a row whose first token differs has 0 matched tokens, and a row equal "
                        "everywhere has all N")
        whole = want == ref.shape[1]
        if whole.any() and torch.equal(out.long()[~whole], want[~whole]):
            return fail(f"right wherever the answer differs somewhere, wrong where it matches all {ref.shape[1]} "
                        "tokens: such a row has no first difference (argmax over `reference != answers` returns 0 "
                        "there), and its count is all N")
        row = int((out.long() != want).nonzero()[0])  # the first prompt you got wrong
        return fail(f"for reference {ref[row].tolist()} and answer {got[row].tolist()} expected {int(want[row])}, "
                    f"got {out[row].item()}")
    return ok("Correct: this is course_lib.metrics.matched_prefix, the 'agree_prefix' of the agreement tables.")


@checked
def check_expected_experts(fn: Callable[[int, int, int], float]) -> Feedback:
    """``fn(experts, top_k, tokens)``: distinct experts ``tokens`` tokens touch on average, each routed uniformly
    to ``top_k`` of ``experts``."""
    for e, k, b in ((64, 8, 1), (64, 8, 16), (8, 2, 4), (128, 8, 32), (64, 8, 0), (8, 8, 3)):
        got = attempt(fn, e, k, b)
        want = expected_experts(e, k, b)
        if isinstance(got, bool) or not isinstance(got, (int, float)) or math.isnan(got):
            return fail(f"return a number (the expected count), got {got!r}")
        if math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9):
            continue
        case = f"E={e}, k={k}, B={b}"
        if math.isclose(got, k * b):
            return fail(f"{case}: k x B = {k * b} counts an expert twice when two tokens pick it (and exceeds E "
                        f"= {e} for big batches). Count the experts *no* token picks: E x (1 - k/E)^B")
        if math.isclose(got, e * (1 - (1 - 1 / e) ** (k * b))):
            return fail(f"{case}: close, but that treats a token's k picks as independent draws that may repeat. A "
                        "token picks k *different* experts, so it misses a given one with probability 1 - k/E")
        if math.isclose(got, e * (1 - k / e) ** b):
            return fail(f"{case}: that is the number of experts *no* token picks; the batch reads the others")
        return fail(f"{case}: got {got:.4g}, expected {want:.4g}")
    return ok("Correct: one token reads its k experts; a batch reads the union, which nears all E quickly (64 "
              "experts, top-8: 8 for one token, 56 for 16 tokens).")
