"""Turn benchmark JSON into a Markdown report and two plots.

* ``results.md`` - the machine, then one table per suite (README-ready);
* ``pareto.png`` - decode tokens/s vs held-out perplexity, every row that has
  both: up and to the left is better, the staircase is the Pareto front;
* ``roofline.png`` - decode tokens/s vs bytes read per token (the model's
  weights), with the memory roof ``tokens/s = bandwidth / bytes`` drawn from
  the measured bandwidth: how close each method gets to what memory allows.

A plot whose data is missing (no suite produced those columns) is skipped and
the report says so. Nothing a user already has is replaced unless asked
(``overwrite``), and the report never deletes a file it did not write.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from .._checks import check_output_path
from ..nb import markdown_table  # the notebooks' table printer; the report's tables are the same

log = logging.getLogger(__name__)


def _label(r: dict) -> str:
    return f"{r.get('suite', '?')}:{r.get('method', '?')}"


def pareto_front(rows: list[dict], speed: str = "decode_tok_s", quality: str = "ppl") -> list[dict]:
    """Rows no other row beats on both speed (higher) and quality (lower perplexity), fastest first."""
    pts = [r for r in rows if _num(r.get(speed)) and _num(r.get(quality))]
    front = [r for r in pts if not any(o[speed] >= r[speed] and o[quality] <= r[quality]
                                       and (o[speed] > r[speed] or o[quality] < r[quality]) for o in pts)]
    return sorted(front, key=lambda r: -r[speed])


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and v > 0


def _new_axes():
    """A Figure without pyplot: no GUI backend needed, and a notebook's backend is left alone."""
    fig = Figure(figsize=(7, 4.5))
    return fig, fig.add_subplot()


def _pareto_points(rows: list[dict], speed: str = "decode_tok_s", quality: str = "ppl") -> list[dict]:
    return [r for r in rows if _num(r.get(speed)) and _num(r.get(quality))]


def _roofline_points(rows: list[dict]) -> list[dict]:
    return [r for r in rows if _num(r.get("decode_tok_s")) and _num(r.get("bytes"))]


def plot_pareto(rows: list[dict], speed: str = "decode_tok_s", quality: str = "ppl", ax=None):
    """Speed vs quality scatter of every row with both numbers, front highlighted. None if no such row."""
    pts = _pareto_points(rows, speed, quality)
    if not pts:
        return None
    fig, ax = (ax.figure, ax) if ax is not None else _new_axes()
    suites = sorted({r.get("suite", "?") for r in pts})
    for s in suites:
        sub = [r for r in pts if r.get("suite", "?") == s]
        ax.scatter([r[quality] for r in sub], [r[speed] for r in sub], label=s, s=40)
        for r in sub:
            ax.annotate(r.get("method", "?"), (r[quality], r[speed]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    front = sorted(pareto_front(pts, speed, quality), key=lambda r: r[quality])
    ax.step([r[quality] for r in front], [r[speed] for r in front], where="post", color="k", lw=1, ls="--",
            label="Pareto front")
    ax.set_xlabel(f"held-out perplexity ({quality}, lower is better)")
    ax.set_ylabel(f"{speed} (higher is better)")
    ax.set_title("Speed vs quality: every variant measured")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_decode_roofline(rows: list[dict], bandwidth_gbs: float | None, ax=None):
    """Decode tokens/s vs weight bytes per token, log-log, with the memory roof. None if no data."""
    pts = _roofline_points(rows)
    if not pts:
        return None
    fig, ax = (ax.figure, ax) if ax is not None else _new_axes()
    xs = np.array([r["bytes"] for r in pts], dtype=float)
    if bandwidth_gbs:
        grid = np.logspace(np.log10(xs.min() / 2), np.log10(xs.max() * 2), 50)
        ax.loglog(grid, bandwidth_gbs * 1e9 / grid, "k-", lw=2,
                  label=f"memory roof: {bandwidth_gbs:.1f} GB/s / bytes")
    for s in sorted({r.get("suite", "?") for r in pts}):
        sub = [r for r in pts if r.get("suite", "?") == s]
        ax.loglog([r["bytes"] for r in sub], [r["decode_tok_s"] for r in sub], "o", label=s)
        for r in sub:
            ax.annotate(r.get("method", "?"), (r["bytes"], r["decode_tok_s"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("bytes read per decode step (model weights)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title("Decode is memory-bound: fewer bytes, more tokens/s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def machine_line(result: dict) -> str:
    """'Measured on ...' with the machine fields and quick mode."""
    machine = ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                        for k, v in result.get("machine", {}).items())
    return f"Measured on {machine}{' (quick mode)' if result.get('quick') else ''}."


def results_markdown(result: dict, plots: dict[str, str | None] | None = None) -> str:
    """README-ready Markdown: machine, one table per suite, the plots (or why each is missing)."""
    rows = result.get("rows", [])
    parts = [machine_line(result), ""]
    suites = list(dict.fromkeys(r.get("suite", "other") for r in rows))
    if not rows:
        parts.append("No rows: no suite ran.")
    for s in suites:
        parts += [f"### {s}", "", markdown_table([r for r in rows if r.get("suite", "other") == s]), ""]
    front = pareto_front(rows)
    if front:
        parts += ["Pareto front (no other variant is both faster and better): "
                  + ", ".join(_label(r) for r in front), ""]
    for name, path in (plots or {}).items():
        parts.append(f"![{name}]({path})" if path else f"({name} plot skipped: no rows with its columns)")
    return "\n".join(parts).rstrip() + "\n"


REPORT_FILES = ("results.md", "pareto.png", "roofline.png")  # everything write_report may write


def check_new_file(path: Path, flag: str, overwrite: bool) -> None:
    """Refuse (before any work) to write ``path`` when it is a folder, exists and ``overwrite`` is off, or
    could not be created (a folder above it is a file, or is not writable)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give the path of a file")
    check_output_path(path, flag)
    if path.exists() and not overwrite:
        raise ValueError(f"{flag} {path} already exists; choose another path, or pass --overwrite "
                         "(overwrite=True) to replace it")


def check_report_dir(out_dir: Path, overwrite: bool) -> None:
    """Refuse a report folder that is a file, or that holds any of :data:`REPORT_FILES` unless ``overwrite``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--report {out_dir} is a file; give the path of a folder")
    check_output_path(out_dir, "--report")
    there = [n for n in REPORT_FILES if (out_dir / n).exists()]
    if there and not overwrite:
        raise ValueError(f"--report {out_dir} already holds {', '.join(there)}; choose another folder, or pass "
                         "--overwrite (overwrite=True) to replace them (other files there are left alone)")


def check_outputs(json_path: str | Path | None, report_dir: str | Path | None, readme: str | Path | None,
                  overwrite: bool = False) -> None:
    """Everything ``bench`` will write, checked before minutes of benchmarking.

    Outputs must not collide (one path given twice, the JSON written over the README or a report file);
    existing files are refused unless ``overwrite``. The README is the exception by design: ``--readme``
    asks for its bench block to be rewritten in place, so it must exist and carry the markers.
    """
    outputs: list[tuple[str, Path]] = []
    if json_path:
        outputs.append(("--json", Path(json_path)))
    if report_dir:
        outputs += [("--report", Path(report_dir))] + [("--report", Path(report_dir) / n) for n in REPORT_FILES]
    if readme:
        outputs.append(("--readme", Path(readme)))
    seen: dict[Path, str] = {}
    for flag, path in outputs:
        key = path.resolve()
        if key in seen:
            raise ValueError(f"{seen[key]} and {flag} would both write {path}; give each output its own path")
        seen[key] = flag
    if json_path:
        check_new_file(Path(json_path), "--json", overwrite)
    if report_dir:
        check_report_dir(Path(report_dir), overwrite)
    if readme:
        check_readme(Path(readme))


def write_report(result: dict, out_dir: Path, overwrite: bool = False) -> Path:
    """Write ``results.md``, ``pareto.png`` and ``roofline.png`` into ``out_dir``; return the Markdown path.

    Refuses a folder that already holds any of them unless ``overwrite``. A plot without data is not
    written, and an earlier one of that name is left alone (the report says this run skipped it).
    """
    out_dir = Path(out_dir)
    check_report_dir(out_dir, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = result.get("rows", [])
    plots: dict[str, str | None] = {}
    for name, fig in (("pareto", plot_pareto(rows)),
                      ("roofline", plot_decode_roofline(rows, result.get("machine", {}).get("bandwidth_gbs")))):
        if fig is None:
            plots[name] = None
            if (out_dir / f"{name}.png").exists():
                log.info("%s.png in %s is not from this run (no rows with its columns); left alone", name, out_dir)
            continue
        fig.savefig(out_dir / f"{name}.png", dpi=120)
        plots[name] = f"{name}.png"
    path = out_dir / "results.md"
    path.write_text(results_markdown(result, plots))
    log.info("report written to %s", out_dir)
    return path


README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def check_readme(readme: Path) -> str:
    """The README's text, or a ValueError when its bench markers are missing (checked before a long run)."""
    readme = Path(readme)
    if not readme.is_file():
        raise ValueError(f"--readme {readme}: no such file")
    text = readme.read_text()
    one_each = text.count(README_BEGIN) == 1 and text.count(README_END) == 1
    if not one_each or text.index(README_BEGIN) > text.index(README_END):
        raise ValueError(f"{readme} needs one {README_BEGIN!r} line followed by one {README_END!r} line; "
                         "add them where the results should go")
    return text


def update_readme(readme: Path, result: dict, report_dir: Path | None = None) -> None:
    """Replace what lies between the bench markers in ``readme`` with this run's tables (and its plots).

    Only that block changes, so the rest of the file (a learner's own notes included) is left alone.
    """
    readme = Path(readme)
    text = check_readme(readme)
    plots: dict[str, str | None] = {}
    if report_dir is not None:
        rows = result.get("rows", [])
        for name, has_data in (("pareto", bool(_pareto_points(rows))), ("roofline", bool(_roofline_points(rows)))):
            png = Path(report_dir) / f"{name}.png"
            # Only a plot of this run (a png from an earlier one may sit there); relative to the README,
            # so the images show on GitHub and in JupyterLab alike.
            plots[name] = os.path.relpath(png, readme.parent) if has_data and png.exists() else None
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{results_markdown(result, plots)}{README_END}{tail}")
