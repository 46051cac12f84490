"""The benchmark report: Markdown per suite, Pareto front, PNG plots, the bench command end to end."""

from __future__ import annotations

import json

import pytest

from course_lib.bench.report import (
    README_BEGIN,
    README_END,
    markdown_table,
    pareto_front,
    plot_decode_roofline,
    plot_pareto,
    update_readme,
    write_report,
)

RESULT = {
    "machine": {"device": "cpu", "bandwidth_gbs": 10.0},
    "quick": True,
    "rows": [
        {"suite": "quant", "method": "fp32", "decode_tok_s": 10.0, "ppl": 5.0, "bytes": 8e8},
        {"suite": "quant", "method": "int8-wo", "decode_tok_s": 30.0, "ppl": 5.02, "bytes": 2e8},
        {"suite": "quant", "method": "slow-and-bad", "decode_tok_s": 5.0, "ppl": 6.0, "bytes": 8e8},
        {"suite": "prune", "method": "structured-50", "decode_tok_s": 40.0, "ppl": 7.0, "bytes": 1e8},
        {"suite": "decode", "method": "no-cache", "decode_tok_s": 3.0, "prefill_ms": 12.5},
    ],
}


def test_markdown_table_union_of_columns():
    md = markdown_table([{"a": 1, "b": 0.123456}, {"a": 2, "c": None}])
    lines = md.splitlines()
    assert lines[0] == "| a | b | c |" and lines[2] == "| 1 | 0.1235 |  |" and lines[3] == "| 2 |  |  |"


def test_pareto_front():
    front = pareto_front(RESULT["rows"])
    # fp32 stays (best perplexity); slow-and-bad is beaten on both axes
    assert [r["method"] for r in front] == ["structured-50", "int8-wo", "fp32"]


def test_plots_skip_when_columns_are_missing():
    assert plot_pareto([{"suite": "decode", "decode_tok_s": 3.0}]) is None
    assert plot_decode_roofline([{"suite": "x", "ppl": 3.0}], 10.0) is None
    fig = plot_decode_roofline(RESULT["rows"], 10.0)
    assert len(fig.axes[0].lines) == 1 + 2  # the roof plus one marker series per suite with bytes


def test_write_report(tmp_path):
    md = write_report(RESULT, tmp_path).read_text()
    assert "quick mode" in md and "bandwidth_gbs: 10" in md
    for suite in ("quant", "prune", "decode"):
        assert f"### {suite}" in md
    assert "Pareto front" in md and "prune:structured-50" in md
    for png in ("pareto.png", "roofline.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md


def test_write_report_without_plot_data(tmp_path):
    (tmp_path / "pareto.png").write_bytes(b"an earlier run's plot")  # must not be linked as this run's
    only_decode = {"machine": {}, "rows": [{"suite": "decode", "method": "x", "decode_tok_s": 1.0}]}
    with pytest.raises(ValueError, match="--overwrite"):
        write_report(only_decode, tmp_path)  # the folder holds a pareto.png: not replaced unasked
    md = write_report(only_decode, tmp_path, overwrite=True).read_text()
    assert "pareto plot skipped" in md
    assert (tmp_path / "pareto.png").read_bytes() == b"an earlier run's plot"  # not this run's: never deleted
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN}\n{README_END}\n")
    update_readme(readme, only_decode, tmp_path)
    assert ".png" not in readme.read_text()


def test_write_report_refuses_the_users_files(tmp_path):
    for name in ("results.md", "pareto.png", "roofline.png"):
        (tmp_path / name).write_text(f"my {name}")
    with pytest.raises(ValueError, match="results.md, pareto.png, roofline.png"):
        write_report(RESULT, tmp_path)
    assert all((tmp_path / n).read_text() == f"my {n}" for n in ("results.md", "pareto.png", "roofline.png"))


@pytest.fixture
def fake_suite(monkeypatch):
    """A stand-in suite module for the bench command; the list records each run (so a test sees no work began)."""
    import sys
    import types

    from course_lib import bench

    calls = []

    def run(quick):
        calls.append(quick)
        return {"machine": {"bandwidth_gbs": 5.0}, "rows": [
            {"suite": "fake", "method": "m", "decode_tok_s": 2.0123456789, "ppl": 4.0, "bytes": 1e9, "quick": quick}]}

    fake = types.ModuleType("course_lib.bench.fake")
    fake.run = run
    monkeypatch.setitem(sys.modules, "course_lib.bench.fake", fake)
    monkeypatch.setattr(bench, "SUITES", (*bench.SUITES, "fake"))
    monkeypatch.setattr(bench, "available_suites", lambda: ["fake"])
    return calls


def test_bench_command_writes_json_and_report(tmp_path, fake_suite, capsys):
    """`python -m course_lib bench --json --report` end to end, with a stand-in suite module."""
    from course_lib.__main__ import main

    rc = main(["bench", "--quick", "--json", str(tmp_path / "b.json"), "--report", str(tmp_path / "rep")])
    assert rc == 0 and fake_suite == [True]
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["quick"] is True and data["rows"][0]["quick"] is True
    assert data["machine"]["bandwidth_gbs"] == 5.0
    assert (tmp_path / "rep" / "pareto.png").exists() and (tmp_path / "rep" / "roofline.png").exists()
    assert "### fake" in (tmp_path / "rep" / "results.md").read_text()
    # stdout: the report's tables with rounded numbers, not the JSON (that is in b.json)
    out = capsys.readouterr().out
    assert "### fake" in out and "| 2.012 |" in out
    assert "2.0123456789" not in out and '"rows"' not in out and str(tmp_path / "b.json") in out


def test_bench_without_json_prints_tables_then_the_json(fake_suite, capsys):
    from course_lib.__main__ import main

    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    assert out.index("### fake") < out.index('"rows"') and "2.0123456789" in out


@pytest.mark.parametrize("existing", ["json", "report"])
def test_bench_refuses_existing_outputs_before_running(tmp_path, fake_suite, capsys, existing):
    from course_lib.__main__ import main

    rep = tmp_path / "rep"
    rep.mkdir()
    mine = tmp_path / "b.json" if existing == "json" else rep / "pareto.png"
    mine.write_text("the user's")
    argv = ["bench", "--json", str(tmp_path / "b.json"), "--report", str(rep)]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and fake_suite == []  # refused before any suite ran
    assert mine.read_text() == "the user's"
    assert main([*argv, "--overwrite"]) == 0 and fake_suite == [False]
    assert json.loads((tmp_path / "b.json").read_text())["rows"]


@pytest.mark.parametrize("outputs", [
    lambda d: ["--json", str(d / "README.md"), "--readme", str(d / "README.md")],
    lambda d: ["--json", str(d / "rep" / "results.md"), "--report", str(d / "rep")],
    lambda d: ["--json", str(d / "rep"), "--report", str(d / "rep")],
    lambda d: ["--readme", str(d / "rep" / "results.md"), "--report", str(d / "rep")],
    lambda d: ["--readme", str(d / "README.md"), "--json", str(d / "sub" / ".." / "README.md")],
], ids=["json=readme", "json=report-file", "json=report-dir", "readme=report-file", "same-file-two-spellings"])
def test_bench_refuses_colliding_outputs_even_with_overwrite(tmp_path, fake_suite, capsys, outputs):
    from course_lib.__main__ import main

    readme_text = f"# mine\n{README_BEGIN}\n{README_END}\nmore of mine\n"
    (tmp_path / "README.md").write_text(readme_text)
    (tmp_path / "sub").mkdir()
    (tmp_path / "rep").mkdir()
    (tmp_path / "rep" / "results.md").write_text(readme_text)
    for extra in ([], ["--overwrite"]):
        assert main(["bench", *extra, *outputs(tmp_path)]) == 2
        assert "both write" in capsys.readouterr().err and fake_suite == []
        assert (tmp_path / "README.md").read_text() == readme_text
        assert (tmp_path / "rep" / "results.md").read_text() == readme_text


def test_bench_readme_block_is_rewritten_without_overwrite(tmp_path, fake_suite):
    """--readme asks for its block to be replaced: that is not an overwrite to refuse."""
    from course_lib.__main__ import main

    readme = tmp_path / "README.md"
    readme.write_text(f"# mine\n{README_BEGIN}\nold\n{README_END}\nmore of mine\n")
    argv = ["bench", "--json", str(tmp_path / "r" / "b.json"), "--report", str(tmp_path / "r"),
            "--readme", str(readme)]
    assert main(argv) == 0
    text = readme.read_text()
    assert text.startswith("# mine\n") and text.endswith("more of mine\n") and "### fake" in text
    assert "old" not in text and "](r/pareto.png)" in text


def test_update_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Course\nmy notes\n{README_BEGIN}\nold table\n{README_END}\nafter\n")
    write_report(RESULT, tmp_path / "docs" / "results")
    update_readme(readme, RESULT, tmp_path / "docs" / "results")
    text = readme.read_text()
    assert text.startswith("# Course\nmy notes\n") and text.endswith(f"{README_END}\nafter\n")
    assert "old table" not in text and "Measured on" in text
    assert "](docs/results/pareto.png)" in text  # image paths relative to the README
    update_readme(readme, RESULT)  # idempotent: one block, replaced again
    assert readme.read_text().count(README_BEGIN) == 1


def test_bench_readme_without_markers_fails_before_running(tmp_path, monkeypatch):
    from course_lib import bench

    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    monkeypatch.setattr(bench, "machine_info", lambda: pytest.fail("the suites ran before the README was checked"))
    with pytest.raises(ValueError, match="bench:begin"):
        bench.run_bench(suites=["decode"], readme=str(readme))
    assert readme.read_text() == "# no markers\n"
