"""transformers shims: spellings that differ between the versions the course runs on (a leaf module).

Imports nothing from course_lib, so every decode loop (generation, speculative decoding, the benches) can take
its compatibility answers from here instead of each keeping a copy.
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def cache_kwarg(model_class: type) -> str:
    """The keyword a model's ``forward`` takes its KV cache by: ``cache`` (transformers 5.x) or ``past_key_values``.

    Looked up once per class: ``inspect.signature`` on every decode step would cost more than a small model's step.
    """
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


@functools.cache
def takes_logits_to_keep(model_class: type) -> bool:
    """Whether a causal LM's ``forward`` can compute the logits of the last positions only (``logits_to_keep``)."""
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters
