"""Prepared GPU check: exercise every CUDA path of the decode/timing/roofline chapters in a few minutes.

    python tests/gpu_check.py [--json PATH]

On a machine without CUDA it prints why and exits 0 (nothing to check). With a GPU it runs, in order:
CUDA-event timing vs perf_counter without synchronize; the from-scratch KV cache against transformers
on the GPU (fp32 and bf16); the greedy loops agreeing; naive attention vs SDPA memory on the GPU;
the machine's bandwidth and matmul GFLOP/s; a compiled static-cache decoder; and the decode bench suite
(full depth), printing one JSON document with every number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--skip-bench", action="store_true", help="skip the decode bench suite (the slowest part)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU on this machine; nothing to check (skipped).")
        return 0

    from course_lib.bench import decode as decode_suite
    from course_lib.generation import CompiledDecoder, attention_cost, generate_hf, generate_kv_cache
    from course_lib.kv_cache import ScratchLlama
    from course_lib.models import speed_lab_model
    from course_lib.roofline import measure_machine
    from course_lib.timing import benchmark, time_once

    dev = torch.device("cuda")
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    t0 = time.perf_counter()

    # 1. timing: events see the work, perf_counter without synchronize sees only the launch
    a = torch.randn(8192, 8192, device=dev)
    res = benchmark(lambda: a @ a, warmup=3, repeat=10, device=dev)
    no_sync = time_once(lambda: a @ a, sync=False, device=dev)
    torch.cuda.synchronize()
    out["timing"] = {"events_ms": res.median * 1e3, "method": res.method, "no_sync_ms": no_sync * 1e3}
    assert res.method == "cuda-events" and no_sync < res.median, out["timing"]

    # 2. the from-scratch cache on the GPU, fp32 and bf16
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 0.15)):
        model, cfg = speed_lab_model("smollm2-135m", dtype=dtype, device=dev, num_layers=4)
        ids = torch.randint(0, cfg.vocab_size, (2, 24), device=dev)
        with torch.inference_mode():
            ref = model(ids).logits.float()
            s = ScratchLlama(model)
            cache = s.new_cache(2, 32)
            mine = torch.cat([s(ids[:, :20], cache)] + [s(ids[:, i:i + 1], cache) for i in range(20, 24)], 1).float()
        err = (mine - ref).abs().max().item()
        out[f"scratch_max_err_{dtype}"] = err
        assert err < tol * ref.abs().max().item(), (dtype, err)
        same = torch.equal(generate_kv_cache(model, ids[:1], 16), generate_hf(model, ids[:1], 16))
        out[f"greedy_agree_{dtype}"] = same

    # 3. attention kernels: time and peak memory on the GPU
    out["attention"] = attention_cost([1024, 4096], heads=16, head_dim=64, dtype=torch.bfloat16, device=dev)

    # 4. the machine
    hw = measure_machine(dev)
    out["machine"] = {"bandwidth_gbs": hw.bandwidth_gbs, "matmul_gflops": hw.matmul_gflops, "gemv_gbs": hw.gemv_gbs}

    # 5. compiled static cache
    model, cfg = speed_lab_model("smollm2-135m", dtype=torch.bfloat16, device=dev)
    ids = torch.randint(0, cfg.vocab_size, (1, 32), device=dev)
    tc = time.perf_counter()
    dec = CompiledDecoder(model)
    compiled = dec(ids, 8, max_len=32 + 128)
    out["compile_s"] = time.perf_counter() - tc
    out["compiled_agrees"] = torch.equal(compiled, generate_kv_cache(model, ids, 8))
    r = benchmark(lambda: dec(ids, 128, max_len=32 + 128), warmup=1, repeat=3, device=dev)
    out["compiled_tok_s"] = 128 / r.median

    # 6. the decode bench suite, full size
    if not args.skip_bench:
        out["decode_suite"] = decode_suite.run(quick=False, device="cuda")
    out["total_s"] = time.perf_counter() - t0
    text = json.dumps(out, indent=2, default=str)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
