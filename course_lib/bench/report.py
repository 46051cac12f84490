"""Turn benchmark JSON into a Markdown table (and, later chapters, plots)."""

from __future__ import annotations

from pathlib import Path


def markdown_table(rows: list[dict]) -> str:
    """One Markdown table over the union of the rows' keys (in first-seen order)."""
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_report(result: dict, out_dir: Path) -> Path:
    """Write ``results.md`` into ``out_dir``; return its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    machine = ", ".join(f"{k}: {v}" for k, v in result["machine"].items())
    path = out_dir / "results.md"
    path.write_text(f"Measured on {machine}{' (quick mode)' if result.get('quick') else ''}\n\n"
                    + markdown_table(result["rows"]) + "\n")
    return path
