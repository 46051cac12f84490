"""Exercises with instant, specific feedback.

Each chapter has a module ``course_lib/exercises/chNN.py`` whose ``check_*``
functions take the learner's answer and return a :class:`Feedback`. A check
must pass on the reference solution and say *what* is wrong otherwise
("your scale is per-tensor; the layer expects per-channel"), never just "wrong".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Feedback:
    """The result of a check: passed or not, and a message that says why."""

    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return ("✅ " if self.passed else "❌ ") + self.message

    def _repr_html_(self) -> str:
        color = "#1b7f3b" if self.passed else "#b00020"
        return f'<div style="color:{color};font-weight:600">{self}</div>'


def ok(message: str = "Correct!") -> Feedback:
    """A passing check."""
    return Feedback(True, message)


def fail(message: str) -> Feedback:
    """A failing check with a specific hint."""
    return Feedback(False, message)


def first_failure(*checks: Feedback, success: str = "Correct!") -> Feedback:
    """The first failing feedback among ``checks``, or a pass if all pass."""
    for c in checks:
        if not c.passed:
            return c
    return ok(success)
