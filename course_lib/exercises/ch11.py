"""Exercises of notebook 11 (tools and trends): pick the tool, read a side-by-side table."""

from __future__ import annotations

from . import Feedback, fail, ok

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


def check_tool_choice(answers: dict) -> Feedback:
    """``answers`` maps each scenario of :data:`SCENARIOS` to a tool name."""
    missing = [s for s in SCENARIOS if s not in answers]
    if missing:
        return fail(f"answer every scenario; missing: {missing[0]!r}")
    for scenario, (good, why) in SCENARIOS.items():
        if answers[scenario] not in good:
            return fail(f"{scenario!r}: not {answers[scenario]!r} - {why}; think of {' or '.join(sorted(good))}.")
    return ok("Correct: the workload picks the tool, not the other way round.")


def check_fastest_correct(answer: str, rows: list[dict], seq_len: int, tol: float = 1e-3) -> Feedback:
    """The fastest tool at ``seq_len`` *among those whose logits match fp32 within* ``tol``."""
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
