"""The quantization methods, by name: each method module registers itself here, and ``quantize_`` looks it up.

A method is what turns a model's float Linear layers into packed ones: round to nearest (:mod:`.rtn`), GPTQ
(:mod:`.gptq`), AWQ and SmoothQuant (:mod:`.awq`). Adding one is one module that calls :func:`register` (and is
imported by the package's ``__init__``); ``QuantConfig(method=name)`` then accepts it and ``quantize_``,
``save_quantized`` and the benchmark suites run it like the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# The registry sits below the config that validates against it: it knows a config only as an object with fields.
Config = Any


@dataclass(frozen=True)
class Method:
    """One quantization method.

    ``quantize_model(model, todo, cfg, calibration, report)`` replaces every layer of ``todo`` (name -> float
    ``nn.Linear``) in ``model`` with a packed layer and notes each in ``report.quantized`` (name -> kernel).
    ``needs_calibration``: ``quantize_`` refuses to run it without calibration token ids.
    ``check(cfg)`` raises ``ValueError`` for a config this method cannot run (its own rules, beyond QuantConfig's).
    ``option``: for a method chosen by a config field rather than by ``method=``, that field's name; the method
    runs whenever the field is set (not None). SmoothQuant is ``smooth=0.5`` on W8A8 round-to-nearest; such a
    method is not a value of ``QuantConfig.method``.
    """

    name: str
    quantize_model: Callable[..., None]  # (model, todo, cfg, calibration, report)
    needs_calibration: bool = False
    check: Callable[[Config], None] | None = None
    option: str | None = None


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` (its name must be new)."""
    if method.name in _METHODS:
        raise ValueError(f"a quantization method named {method.name!r} is already registered")
    _METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (a test's, for example)."""
    _METHODS.pop(name, None)


def method_names() -> tuple[str, ...]:
    """The values ``QuantConfig(method=...)`` accepts."""
    return tuple(n for n, m in _METHODS.items() if m.option is None)


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise ValueError(f"method must be one of {method_names()}, got {name!r}")
    return _METHODS[name]


def selected_methods(cfg: Config) -> list[Method]:
    """The methods a config field selects (``option`` set), in registration order."""
    return [m for m in _METHODS.values() if m.option is not None and getattr(cfg, m.option, None) is not None]


def method_for(cfg: Config) -> Method:
    """The method that runs ``cfg``: one a config option selects, else ``cfg.method``."""
    chosen = selected_methods(cfg)
    return chosen[0] if chosen else get_method(cfg.method)
