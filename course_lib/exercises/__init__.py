"""Exercises with instant, specific feedback.

Each chapter has a module ``course_lib/exercises/chNN.py`` whose ``check_*``
functions take the learner's answer and return a :class:`Feedback`. A check
must pass on the reference solution and say *what* is wrong otherwise
("your scale is per-tensor; the layer expects per-channel"), never just "wrong".
"""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Feedback:
    """The result of a check: passed or not, and a message that says why."""

    passed: bool
    message: str
    done: bool = True  # False: the learner's stub is still unfinished (not a wrong answer)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        return ("✅ " if self.passed else "❌ " if self.done else "⏳ ") + self.message

    def _repr_html_(self) -> str:
        color = "#1b7f3b" if self.passed else "#b00020" if self.done else "#8a6d00"
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


def not_done(what: str = "the function") -> Feedback:
    """Feedback for an unfinished stub: not a failure of the learner's idea, just not written yet."""
    return Feedback(False, f"Not done yet: fill in {what} and run this cell again.", done=False)


class _Unfinished(Exception):
    """Raised by :func:`attempt` to carry the feedback for a stub or a crash out of a check."""

    def __init__(self, feedback: Feedback) -> None:
        super().__init__(feedback.message)
        self.feedback = feedback


def attempt(fn: Callable[..., Any], *args: Any, what: str | None = None, **kwargs: Any) -> Any:
    """Call the learner's ``fn``; a stub (NotImplementedError) or a crash becomes feedback via :func:`checked`."""
    name = what or f"`{getattr(fn, '__name__', 'your function')}`"
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise _Unfinished(not_done(name)) from None
    except Exception as e:  # a learner's bug is feedback, not a crash
        raise _Unfinished(fail(f"{name} raised {type(e).__name__}: {e}")) from None


def checked(check: Callable[..., Feedback]) -> Callable[..., Feedback]:
    """Decorator for ``check_*`` functions that call the learner's code through :func:`attempt`."""
    @functools.wraps(check)
    def wrapper(*args: Any, **kwargs: Any) -> Feedback:
        try:
            return check(*args, **kwargs)
        except _Unfinished as u:
            return u.feedback

    return wrapper


def require(feedback: Feedback) -> Feedback:
    """Raise if a check did not pass: the reference-solution cells use it so CI proves each exercise is solvable."""
    if not feedback.passed:
        raise AssertionError(f"the reference solution failed its own check: {feedback.message}")
    return feedback


def graded(check: Callable[[], Feedback]) -> None:
    """The autograder's test: run ``check`` and raise ``AssertionError`` with its feedback unless it passes.

    The graded cells of the instructor edition call it (``graded(lambda: ch07.check_kd_loss(my_kd_loss))``): the
    error's message is what the gradebook shows. Warnings and stderr are kept out of the cell's output, because
    nbgrader scores a graded cell that writes to stderr 0, whatever the check said.
    """
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            feedback = check()
    except Exception as e:  # e.g. a NameError: the learner's cell that defines the answer did not run
        raise AssertionError(f"the check could not run: {type(e).__name__}: {e}") from None
    if not isinstance(feedback, Feedback):
        raise TypeError(f"graded() expects a check that returns Feedback, got {type(feedback).__name__}")
    if not feedback.passed:
        raise AssertionError(str(feedback))
    print(feedback)
