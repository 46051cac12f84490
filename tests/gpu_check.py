"""The one script to run when a GPU machine is lent: every GPU test, every notebook, one table of results.

    python tests/gpu_check.py [--json PATH] [--budget SECONDS] [--skip-tests] [--skip-notebooks] [--skip-table]
    python tests/gpu_check.py --dry        # the same plumbing on the CPU, one small model, under a minute

With a CUDA GPU it runs, in this order, within ``--budget`` seconds (default 480; a part that would start after
the budget is spent is reported as skipped, never silently dropped):

1. the table: decode tokens/s and the % of the GPU's measured bandwidth that they read, for bf16 / int8 / int4
   weights, compiled without and with CUDA graphs, on the SmolLM2-135M and Llama-3.2-1B speed-lab shapes
   (random weights: speed does not depend on their values), measured first, while nothing else runs;
2. ``pytest -m gpu tests/`` - the GPU tests (int4 CUDA kernel vs the dequantized reference, int8 on CUDA, GPTQ on
   the GPU, CUDA-event timing, the compiled decoder with CUDA graphs, ...);
3. every notebook under nbval in quick mode with ``COURSE_DEVICE=cuda``, a few at a time (each is small).

``--dry`` (or ``COURSE_DEVICE=cpu``) runs part 1 on the CPU for the first shape, one layer, a graph-only compile
(``backend="eager"``) and lists the commands of parts 2 and 3 without running them: it checks the plumbing
(device, quantization, compiled decoding, timing, the table), not speed. tests/test_gpu_check.py runs it in CI.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = (("smollm2-135m", 64), ("llama-3.2-1b", 128))  # (speed-lab shape, int4 group size that fits it)
FORMATS = ("bf16", "int8", "int4")


def _pytest(args: list[str], env: dict, timeout: float) -> dict:
    """Run pytest in a child process; its exit status and last lines."""
    cmd = [sys.executable, "-m", "pytest", *args]
    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        tail = (res.stdout + res.stderr).strip().splitlines()[-1:] or [""]
        status = "passed" if res.returncode == 0 else f"FAILED (exit {res.returncode})"
        out = {"status": status, "summary": tail[0][:200]}
    except subprocess.TimeoutExpired:
        out = {"status": f"TIMEOUT after {timeout:.0f} s", "summary": ""}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def _notebook_cmd(nb: Path) -> list[str]:
    return ["--nbval-lax", "-p", "scripts.notebook_budget", str(nb.relative_to(ROOT)), "-q"]


def speed_table(device, dry: bool, deadline: float) -> tuple[list[dict], float]:
    """(one row per shape x format x compile mode, the measured bandwidth in GB/s)."""
    import torch

    from course_lib.generation import CompiledDecoder
    from course_lib.machine import measure_bandwidth
    from course_lib.metrics import model_size_bytes
    from course_lib.models import speed_lab_model
    from course_lib.quantization import QuantConfig, quantize_
    from course_lib.timing import time_tokens

    bandwidth = measure_bandwidth(size_mb=16 if dry else 1024, repeat=3 if dry else 10, device=device)
    on_cuda = device.type == "cuda"
    modes = (("compiled", "default"), ("compiled + CUDA graphs", "reduce-overhead"))
    prompt_len, new = (8, 8) if dry else (32, 128)
    rows = []
    for shape, group in SHAPES:
        for fmt in FORMATS:
            for label, mode in modes:
                row = {"shape": shape, "format": fmt, "loop": label}
                rows.append(row)
                if time.perf_counter() > deadline:
                    row["status"] = "skipped: budget spent"
                    continue
                if dry and shape != SHAPES[0][0]:
                    row["status"] = "not run (dry: the first shape checks the plumbing)"
                    continue
                if mode == "reduce-overhead" and not on_cuda:
                    row["status"] = f"n/a on {device.type} (CUDA graphs need a GPU)"
                    continue
                try:
                    torch._dynamo.reset()  # one decode_static code object for every row: stay under the recompile limit
                    model, cfg = speed_lab_model(shape, dtype="bf16", device=device, num_layers=1 if dry else None)
                    if fmt != "bf16":
                        cfg_q = QuantConfig(bits=8) if fmt == "int8" else QuantConfig(bits=4, group_size=group)
                        quantize_(model, cfg_q)
                    kernels = sorted({m.kernel for m in model.modules() if hasattr(m, "kernel")})
                    ids = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
                    ids = ids.to(device)
                    dec = CompiledDecoder(model, mode=None if dry else mode, backend="eager" if dry else "inductor")
                    run = lambda p, n, d=dec: d(p, n, max_len=prompt_len + new)  # noqa: E731  one cache size
                    t0 = time.perf_counter()
                    run(ids, 4)  # compiles; with CUDA graphs, the steps after the first record and replay
                    compile_s = time.perf_counter() - t0
                    _, tok_s = time_tokens(run, ids, new, device=device, repeat=1 if dry else 3, warmup=1)
                    nbytes = model_size_bytes(model)  # every weight is read once per token (the embedding: ~1 row)
                    row.update(status="measured", tok_s=round(tok_s, 1), weight_mb=round(nbytes / 2**20, 1),
                               pct_bandwidth=round(100 * nbytes * tok_s / 1e9 / bandwidth, 1),
                               compile_s=round(compile_s, 1), kernels=kernels)
                    del model, dec
                    if on_cuda:
                        torch.cuda.empty_cache()
                except Exception as e:  # a row that cannot run says why; the others still run
                    row["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return rows, bandwidth


def format_table(rows: list[dict], bandwidth: float, device_name: str) -> str:
    lines = [f"decode on {device_name}; measured bandwidth {bandwidth:.0f} GB/s",
             f"{'shape':<14}{'format':<7}{'loop':<24}{'tok/s':>9}{'% of BW':>9}{'MB':>9}  kernels / status"]
    for r in rows:
        if r.get("status") == "measured":
            lines.append(f"{r['shape']:<14}{r['format']:<7}{r['loop']:<24}{r['tok_s']:>9.1f}{r['pct_bandwidth']:>8.1f}%"
                         f"{r['weight_mb']:>9.1f}  {', '.join(r['kernels']) or '-'}")
        else:
            lines.append(f"{r['shape']:<14}{r['format']:<7}{r['loop']:<24}{'':>9}{'':>9}{'':>9}  {r['status']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="the same plumbing on the CPU, tiny sizes")
    parser.add_argument("--json", help="also write every result here")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    parser.add_argument("--jobs", type=int, default=4, help="notebooks run at the same time (default 4)")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-notebooks", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    args = parser.parse_args(argv)
    dry = args.dry or os.environ.get("COURSE_DEVICE", "").strip().lower() == "cpu"
    if dry:
        os.environ["COURSE_DEVICE"] = "cpu"  # before course_lib reads it (once)
    os.environ.setdefault("TQDM_DISABLE", "1")  # one table, not a screen of progress bars

    import torch

    from course_lib.device import course_device

    t_start = time.perf_counter()
    deadline = t_start + args.budget
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; run with --dry to check the plumbing on the CPU.")
        return 0
    device = torch.device("cpu") if dry else torch.device("cuda")
    if not dry and course_device().type != "cuda":
        print(f"gpu_check: COURSE_DEVICE={os.environ.get('COURSE_DEVICE')!r} is not the GPU; unset it or use cuda")
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    out: dict = {"device": name, "torch": torch.__version__, "dry": dry}
    env = {**os.environ, "COURSE_DEVICE": "cuda", "COURSE_QUICK": "1", "PYTHONPATH": str(ROOT)}
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    failed = False

    if not args.skip_table:
        # the table gets a share of the budget, so the tests and notebooks still run after it
        rows, bandwidth = speed_table(device, dry, min(deadline, t_start + 0.55 * args.budget))
        out["table"], out["bandwidth_gbs"] = rows, bandwidth
        print(format_table(rows, bandwidth, name))
        failed |= any(r["status"].startswith("error") for r in rows)
    if not args.skip_tests:
        cmd = ["-m", "gpu", "tests", "-q", "-p", "no:cacheprovider"]
        if dry:
            out["tests"] = {"status": "not run (dry)", "command": "pytest " + " ".join(cmd)}
        else:
            left = deadline - time.perf_counter()
            out["tests"] = _pytest(cmd, env, left) if left > 5 else {"status": "skipped: budget spent"}
            failed |= out["tests"]["status"].startswith(("FAILED", "TIMEOUT"))
        print(f"GPU tests: {out['tests']['status']} {out['tests'].get('summary', '')}", flush=True)

    if not args.skip_notebooks:
        out["notebooks"] = {}
        if dry:
            for nb in notebooks:
                out["notebooks"][nb.name] = {"status": "not run (dry)",
                                             "command": "pytest " + " ".join(_notebook_cmd(nb))}
        else:
            def one(nb: Path) -> dict:
                left = deadline - time.perf_counter()  # measured when this notebook starts, not when queued
                return _pytest(_notebook_cmd(nb), env, left) if left > 5 else {"status": "skipped: budget spent"}

            with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
                futures = {nb.name: pool.submit(one, nb) for nb in notebooks}
                for nb_name, fut in futures.items():
                    out["notebooks"][nb_name] = fut.result()
                    failed |= out["notebooks"][nb_name]["status"].startswith(("FAILED", "TIMEOUT"))
        for nb_name, r in out["notebooks"].items():
            print(f"{nb_name:<28} {r['status']} {r.get('seconds', '')}", flush=True)

    out["total_s"] = round(time.perf_counter() - t_start, 1)
    print(f"gpu_check: {'FAILED' if failed else 'ok'} in {out['total_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
