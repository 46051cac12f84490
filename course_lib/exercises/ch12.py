"""Notebook 12 (FAQ): self-check quizzes with instant feedback, and two numeric checks.

Each quiz question names the chapter that *measured* its answer, so a wrong
answer sends the learner back to the evidence, not to a definition.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import Feedback, fail, ok


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
    Question("decode-bound", "At batch size 1, what limits the speed of a decode step on most hardware?",
             ("arithmetic (FLOP/s)", "memory bandwidth: every weight is read once per token",
              "the tokenizer", "disk speed"),
             1, "One decode step does ~2 FLOPs per weight read: far below what any chip computes per byte.",
             {0: "Count FLOPs per byte: about 1 at batch 1 in bf16. Compute units wait for memory.",
              2: "Tokenizing takes microseconds; time it.", 3: "The weights are in RAM after loading."},
             "08_math_model"),
    Question("unstructured", "You zero 50% of the weights (unstructured magnitude pruning) and keep dense "
             "kernels. Decode speed...", ("roughly doubles", "stays about the same", "halves"),
             1, "A dense matmul multiplies zeros as fast as any other number and still reads them from memory.",
             {0: "The zeros are still stored and read: measure it in notebook 06.",
              2: "Nothing extra is computed either."}, "06_pruning"),
    Question("int8", "Weight-only int8 quantization mostly speeds up...",
             ("prefill of long prompts", "decode (token-by-token generation)", "tokenization"),
             1, "Decode is memory-bound: 4x fewer bytes than fp32 means fewer bytes to stream per token.",
             {0: "Prefill is compute-bound; int8 weights are dequantized to compute, so FLOPs don't drop.",
              2: "Tokenization does not touch the weights."}, "05_quantization"),
    Question("batching", "A server raises its batch from 1 to 8 during decode. What happens on a "
             "memory-bound model?", ("throughput ~8x, each user's time per token grows a little",
                                     "throughput unchanged, latency 8x", "both improve 8x"),
             0, "The weights are read once for all 8 rows, so 8 tokens cost little more than 1.",
             {1: "That would be true if the step were compute-bound; measure it in notebook 10's sweep.",
              2: "A bigger batch never makes a single user's step faster."}, "10_applications"),
    Question("speculative", "Speculative decoding with a small draft model keeps the output...",
             ("identical to the target's greedy output", "approximately the same", "as good as the draft's"),
             0, "The target verifies every drafted token; rejected ones are replaced by its own choice.",
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
    if choice is None:
        return fail("Pick an option first.")
    if not 0 <= choice < len(q.options):
        return fail(f"choice must be between 0 and {len(q.options) - 1}")
    if choice == q.answer:
        return ok(f"{q.why} (measured in notebook {q.chapter})")
    return fail(f"{q.hints.get(choice, 'Not this one.')} See notebook {q.chapter}.")


def quiz_panel(qid: str):
    """An ipywidgets quiz: radio buttons and instant feedback. Returns (widget, update(choice))."""
    import ipywidgets as w

    q = QUIZ[qid]
    radio = w.RadioButtons(options=[(o, i) for i, o in enumerate(q.options)], value=None,
                           layout=w.Layout(width="max-content"))
    out = w.HTML()

    def update(choice):
        out.value = check_quiz(qid, choice)._repr_html_()

    radio.observe(lambda change: update(change["new"]), names="value")
    return w.VBox([w.HTML(f"<b>{q.text}</b>"), radio, out]), update


def check_kv_cache_bytes(answer: float, layers: int, kv_heads: int, head_dim: int, tokens: int,
                         bits: int = 16) -> Feedback:
    """KV cache bytes for ``tokens`` tokens: 2 (K and V) x layers x kv_heads x head_dim x tokens x bits / 8."""
    want = 2 * layers * kv_heads * head_dim * tokens * bits / 8
    if abs(answer - want) <= 0.01 * want:
        return ok(f"Correct: {want / 2**20:.1f} MiB.")
    if abs(answer - want / 2) <= 0.01 * want:
        return fail("Both keys and values are cached: multiply by 2.")
    if abs(answer - want * 8) <= 0.01 * want * 8:
        return fail("That is bits: divide by 8.")
    return fail(f"Not quite (you gave {answer:g}). 2 x layers x kv_heads x head_dim x tokens x bytes per value.")
