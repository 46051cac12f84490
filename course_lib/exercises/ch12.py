"""Notebook 12 (FAQ): self-check quizzes with instant feedback, and two functions to write.

Each quiz question names the chapter that *measured* its answer, so a wrong
answer sends the learner back to the evidence, not to a definition.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import ipywidgets as w
import torch
import torch.nn.functional as F

from ..timing import BenchResult, speed_verdict
from . import Feedback, attempt, checked, fail, ok


@dataclass(frozen=True)
class Question:
    qid: str
    text: str
    options: tuple[str, ...]
    answer: int  # index into options
    why: str  # shown when right
    hints: dict  # option index -> what is wrong with it
    chapter: str  # where it was measured

    def __post_init__(self):
        if not 0 <= self.answer < len(self.options):
            raise ValueError(f"{self.qid}: answer index {self.answer} out of range for {len(self.options)} options")


QUIZ: dict[str, Question] = {q.qid: q for q in (
    Question("decode-bound", "In the roofline model, what bounds a batch-1 decode step of a model with hundreds of "
             "millions of parameters?",
             ("arithmetic (FLOP/s)", "memory bandwidth: every weight is read once per token",
              "the tokenizer", "disk speed"),
             1, "One decode step does 2 FLOPs per weight it reads: about 1 FLOP per byte in bf16, far below the "
                "ridge point of any chip (notebook 11's table: 150-400 FLOP/byte on recent GPUs). What a framework "
                "adds per step (Python, kernel launches) comes on top; notebook 08 measures both on this machine.",
             {0: "Count FLOPs per byte: 2 FLOPs per 2-byte weight is about 1 FLOP/byte, and every chip computes "
                 "far more per byte it can read. Compute units wait for memory.",
              2: "Tokenizing takes microseconds; time it.", 3: "The weights are in memory after loading."},
             "08_math_model"),
    Question("unstructured", "You zero 50% of the weights (unstructured magnitude pruning) and keep dense "
             "kernels. Decode speed...", ("roughly doubles", "stays about the same", "halves"),
             1, "A dense matmul multiplies zeros as fast as any other number and still reads them from memory.",
             {0: "The zeros are still stored and read: measure it in notebook 06.",
              2: "Nothing extra is computed either."}, "06_pruning"),
    Question("int8", "Weight-only int8 quantization stores each weight in 1 byte instead of 4 (fp32). Which phase "
             "can that make faster, given a fast int8 kernel for this device?",
             ("prefill of long prompts", "decode (token-by-token generation)", "tokenization"),
             1, "Decode streams every weight once per token, so 4x fewer bytes can mean up to 4x less time per "
                "step - but only where a fast int8 kernel exists; without one int8 can be slower than fp32, which "
                "is why notebook 05 measures it on this machine before believing it.",
             {0: "Prefill does many FLOPs per weight byte (compute-bound); int8 weights are converted to compute, "
                 "so the FLOPs don't drop.",
              2: "Tokenization does not touch the weights."}, "05_quantization"),
    Question("batching", "A server raises its decode batch from 1 to 8 on a model whose batch-1 step is "
             "memory-bound. What happens?",
             ("throughput rises, by up to 8x, and each user's time per token grows - how much depends on the machine",
              "throughput unchanged, each user's time per token 8x",
              "throughput and each user's time per token both improve 8x",
              "throughput exactly 8x, each user's time per token unchanged"),
             0, "The weights are read once for all 8 rows, so 8 tokens cost much less than 8 steps. But each step "
                "does 8x the FLOPs, reads 8 KV caches, and switches from a matrix-vector to a matrix-matrix "
                "kernel, so time per token grows: a little on a GPU, a lot on a CPU, where the batch-8 step "
                "approaches the compute roof. Notebook 10's sweep measures it on this machine.",
             {1: "That would hold only if the batch-1 step were already compute-bound; it is memory-bound, and "
                 "the weights are shared by all 8 rows.",
              2: "A bigger batch never makes a single user's step faster: the step does more work.",
              3: "The step does 8x the FLOPs and reads 8 KV caches: its time grows, measurably (notebook 10's "
                 "sweep). Only the weight reads are shared."}, "10_applications"),
    Question("speculative", "Greedy speculative decoding with a small draft model keeps the output...",
             ("identical to the target's greedy output", "approximately the same", "as good as the draft's"),
             0, "The target verifies every drafted token; the first it disagrees with is replaced by its own "
                "choice. (The sampling version keeps the target's output *distribution*.)",
             {1: "It is exact, not approximate: tested token for token in notebook 07.",
              2: "The draft only proposes; the target decides."}, "07_distillation"),
    Question("formula", "The article's formula V = P·C/H says a model with more parameters is...",
             ("faster, which is wrong", "slower, which is right", "neither: P cancels out"),
             0, "V grows with P and C in the formula; measured speed falls with them (notebook 08).",
             {1: "Read the formula again: P is in the numerator.", 2: "Nothing cancels P."}, "08_math_model"),
)}


def check_quiz(qid: str, choice: int | None) -> Feedback:
    """Feedback on option ``choice`` of question ``qid``."""
    if qid not in QUIZ:
        raise ValueError(f"unknown question {qid!r}; choose from {sorted(QUIZ)}")
    q = QUIZ[qid]
    if choice is None:  # nothing picked yet: a prompt, not a wrong answer (no red cross before the first click)
        return Feedback(False, "Pick an option.", done=False)
    if not 0 <= choice < len(q.options):
        return fail(f"choice must be between 0 and {len(q.options) - 1}")
    if choice == q.answer:
        return ok(f"{q.why} (measured in notebook {q.chapter})")
    return fail(f"{q.hints.get(choice, 'Not this one.')} See notebook {q.chapter}.")


def quiz_panel(qid: str):
    """An ipywidgets quiz: radio buttons and instant feedback. Returns (widget, update(choice))."""
    q = QUIZ[qid]
    radio = w.RadioButtons(options=[(o, i) for i, o in enumerate(q.options)], value=None,
                           layout=w.Layout(width="max-content"))
    out = w.HTML()

    def update(choice):
        out.value = check_quiz(qid, choice)._repr_html_()

    radio.observe(lambda change: update(change["new"]), names="value")
    return w.VBox([w.HTML(f"<b>{q.text}</b>"), radio, out]), update


# --- 12.1 perplexity from logits --------------------------------------------------------------------------


def _nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL: position t predicts token t + 1 (as in course_lib.metrics.perplexity)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), ids[:, 1:].reshape(-1))


@checked
def check_perplexity(fn: Callable) -> Feedback:
    """The learner's ``fn(logits (B, T, V), ids (B, T)) -> float``: exp of the mean next-token NLL."""
    g = torch.Generator().manual_seed(12)
    for b, t, v in ((2, 9, 11), (3, 17, 32), (1, 33, 7)):
        logits = torch.randn(b, t, v, generator=g) * 2
        ids = torch.randint(0, v, (b, t), generator=g)
        want = math.exp(_nll(logits, ids).item())
        got = attempt(fn, logits.clone(), ids.clone(), what="`my_perplexity`")
        try:
            got = float(got)
        except (TypeError, ValueError):
            return fail(f"return one number (a float), got {type(got).__name__}")
        if math.isclose(got, want, rel_tol=1e-4):
            continue
        no_shift = math.exp(F.cross_entropy(logits.reshape(-1, v), ids.reshape(-1)).item())
        nll = math.log(want)
        per_token = F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1), reduction="none")
        if math.isclose(got, no_shift, rel_tol=1e-4):
            return fail("the logits at position t predict token t + 1: compare logits[:, :-1] with ids[:, 1:] "
                        "(you scored each position against its own token)")
        misaligned = {  # the two other ways to pair a shifted slice with an unshifted one
            "logits[:, 1:] with ids[:, :-1] (each position scored against the token *before* it)":
                (logits[:, 1:], ids[:, :-1]),
            "logits[:, :-1] with ids[:, :-1] (each position scored against its own token)":
                (logits[:, :-1], ids[:, :-1])}
        for pairing, (lg, tg) in misaligned.items():
            if math.isclose(got, math.exp(F.cross_entropy(lg.reshape(-1, v), tg.reshape(-1)).item()), rel_tol=1e-4):
                return fail(f"you compared {pairing}; the logits at position t predict token t + 1: compare "
                            "logits[:, :-1] with ids[:, 1:]")
        if math.isclose(got, nll, rel_tol=1e-4):
            return fail("that is the mean negative log-likelihood; perplexity is exp() of it")
        if any(math.isclose(got, x, rel_tol=1e-4) for x in (2 ** nll, math.exp(nll / math.log(2)))):
            return fail("use the natural log and exp (cross-entropy in nats), not base 2")
        if math.isclose(got, per_token.exp().mean().item(), rel_tol=1e-4):
            return fail("you averaged per-token perplexities; perplexity is exp of the *mean* NLL (one rare token "
                        "would dominate a mean of exps)")
        if math.isclose(got, per_token.sum().exp().item(), rel_tol=1e-4) or math.isinf(got):
            return fail("you summed the NLL over tokens; take the mean, so perplexity does not grow with length")
        return fail(f"for a ({b}, {t}, {v}) case expected {want:.4f}, got {got:.4f}")
    return ok("Correct: exp(mean next-token NLL), what course_lib.metrics.perplexity computes over its windows.")


# --- 12.2 a speed verdict that respects the noise ----------------------------------------------------------

VERDICTS = ("a faster", "b faster", "no measurable difference")


def reference_verdict(a: list[float], b: list[float]) -> str:
    """The course's rule, through :func:`course_lib.timing.speed_verdict`: p10-p90 ranges that overlap are noise."""
    ra, rb = BenchResult.from_times(list(a), "given"), BenchResult.from_times(list(b), "given")
    text = speed_verdict(("a", ra), ("b", rb))  # "a is 1.4x faster/slower than b here (...)" or "no measurable..."
    return "no measurable difference" if text.startswith("no measurable") else (
        "a faster" if "faster" in text.split("(")[0] else "b faster")


def _verdict_cases() -> list[tuple[str, list[float], list[float]]]:
    r = random.Random(12)
    noisy = lambda mid, spread, n=11: [mid + spread * r.uniform(-1, 1) for _ in range(n)]  # noqa: E731
    cases = [("separated", noisy(10.0, 0.5), noisy(14.0, 0.5)),
             ("separated, b faster", noisy(20.0, 1.0), noisy(12.0, 1.0)),
             ("overlap", noisy(10.0, 3.0), noisy(11.0, 3.0)),  # the medians differ; the spreads overlap
             ("overlap, reversed", noisy(11.5, 4.0), noisy(10.0, 4.0))]
    # one outlier each: min-max ranges overlap, p10-p90 do not
    a, b = noisy(10.0, 0.3), noisy(13.0, 0.3)
    a[3], b[5] = 30.0, 1.0
    cases.append(("one outlier", a, b))
    return cases


@checked
def check_verdict(fn: Callable) -> Feedback:
    """The learner's ``fn(times_a, times_b) -> one of VERDICTS`` (seconds per call of a and of b)."""
    for name, a, b in _verdict_cases():
        want = reference_verdict(a, b)
        got = attempt(fn, list(a), list(b), what="`my_verdict`")
        if got not in VERDICTS:
            return fail(f"return one of {VERDICTS}, got {got!r}")
        if got == want:
            continue
        med_a, med_b = statistics.median(a), statistics.median(b)
        if name.startswith("overlap"):
            return fail(f"the medians differ ({med_a:.2f} vs {med_b:.2f}) but the p10-p90 ranges overlap: that "
                        "difference is inside the noise - say 'no measurable difference'")
        if name == "one outlier":
            return fail("one outlier sample should not decide: compare the p10-p90 ranges, not min-max")
        return fail(f"a's median is {med_a:.2f}, b's {med_b:.2f}, and the ranges do not overlap: the "
                    f"smaller time is the faster one (expected {want!r})")
    return ok("Correct: the rule of course_lib.timing.speed_verdict, used by every timing sentence of the course.")
