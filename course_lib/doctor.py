"""``python -m course_lib doctor``: is this machine ready for the course?"""

from __future__ import annotations

import os
import platform
import time


def environment_report() -> dict:
    """Versions, device and threads: what every notebook prints first."""
    import torch
    import transformers

    from . import __version__

    info = {
        "course_lib": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    try:
        import torch_pruning

        info["torch_pruning"] = torch_pruning.__version__
    except ImportError:
        info["torch_pruning"] = None
    return info


def run_doctor() -> int:
    """Print the report, measure bandwidth, load the embedded model; 0 when all is well."""
    from .machine import measure_bandwidth
    from .metrics import perplexity
    from .models import DEFAULT_MODEL, count_parameters, load_model

    ok = True
    for k, v in environment_report().items():
        print(f"{k:>16}: {v}")
    print(f"{'bandwidth':>16}: {measure_bandwidth(size_mb=128):.1f} GB/s (copy, measured now)")
    try:
        t0 = time.perf_counter()
        model, tok = load_model(DEFAULT_MODEL)
        ppl = perplexity(model, tok, max_tokens=4096)
        print(f"{'embedded model':>16}: {DEFAULT_MODEL} loads, {count_parameters(model) / 1e6:.2f}M parameters, "
              f"held-out perplexity {ppl:.2f} on 4k tokens ({time.perf_counter() - t0:.1f} s)")
    except Exception as e:  # doctor reports, it does not crash
        ok = False
        print(f"{'embedded model':>16}: FAILED - {e}")
    try:  # the real chat model: the first load converts its GGUF into the cache (once, ~20 s)
        from . import real_model

        t0 = time.perf_counter()
        model, tok = load_model(real_model.NAME)
        print(f"{'real model':>16}: {real_model.NAME} loads, {count_parameters(model) / 1e6:.1f}M parameters "
              f"({time.perf_counter() - t0:.1f} s); {real_model.model_source()}")
    except Exception as e:
        ok = False
        print(f"{'real model':>16}: FAILED - {e}")
    print("all good" if ok else "problems found (see above)")
    return 0 if ok else 1
