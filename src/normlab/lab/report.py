"""``normlab lab report``: a Markdown report and a self-contained HTML page (PNGs embedded)."""

from __future__ import annotations

import base64
import html
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import __version__
from .experiments import REGISTRY, mean_std
from .runner import load_claims, load_results

__all__ = ["claims_rows", "write_report"]


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    ax = abs(float(x))
    return f"{x:.3g}" if ax != 0 and (ax < 0.01 or ax >= 1000) else f"{x:.3f}"


def _measured(c: dict[str, Any]) -> str:
    """``mean ± std``; with a missing (diverged) seed: n/a, how many, and the others' mean ± std."""
    text = f"{_fmt(c['mean'])} ± {_fmt(c['std'])}"
    values = c.get("values") or []
    ok = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if len(ok) == len(values):
        return text
    # NaN never passes, so a passing claim's missing value was +inf (a ratio over a zero count)
    if c.get("passed"):
        return "∞ (a ratio over 0)"
    if len(values) == 1:
        return "n/a (not finite)"
    rest = ""
    if ok:
        mean, std = mean_std(ok)
        rest = f"; the others {_fmt(mean)} ± {_fmt(std)}"
    return f"n/a ({len(values) - len(ok)} of {len(values)} seeds diverged{rest})"


def claims_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """Summary rows: experiment, dataset, claim, measured mean ± std, comparison, result."""
    rows = []
    for rec in records:
        for c in rec["claims"]:
            claim = c["claim"]
            rows.append(
                [
                    rec["experiment"],
                    rec["dataset"] + (" (quick)" if rec.get("quick") else ""),
                    claim["statement"],
                    _measured(c),
                    f"{claim['comparison']} {_fmt(c['threshold'])}",
                    "PASS" if c["passed"] else "FAIL",
                ]
            )
    return rows


_HEAD = [
    "experiment",
    "dataset",
    "claim",
    "measured (mean ± std over seeds)",
    "threshold",
    "result",
]


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table_from_md(md: str) -> str:
    """A pipe table (as experiments' ``table()`` return) rendered as HTML."""
    lines = [ln.strip() for ln in md.strip().splitlines() if ln.strip().startswith("|")]
    if len(lines) < 2:
        return f"<pre>{html.escape(md)}</pre>" if md.strip() else ""
    cells = [[html.escape(c.strip()) for c in ln.strip("|").split("|")] for ln in lines]
    head, body = (
        cells[0],
        [r for r in cells[1:] if not all(re.fullmatch(r"-+:?|:?-+:?", c) for c in r)],
    )
    out = ["<table><thead><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr></thead><tbody>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in body]
    return "\n".join(out) + "</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.PASS{color:#126b12;font-weight:bold}.FAIL{color:#b00020;font-weight:bold}
img{max-width:100%;border:1px solid #eee}.note{color:#555}"""


def write_report(out: Path) -> tuple[Path, Path]:
    """Write ``<out>/report.md`` and ``<out>/report.html`` from every experiment's claims and results."""
    out = Path(out)
    records = load_claims(out)
    if not records:
        raise FileNotFoundError(
            f"no experiment results under {out}: run `normlab lab run ...` first"
        )
    rows = claims_rows(records)
    passed = sum(r[-1] == "PASS" for r in rows)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    levels = (
        " Setups state absolute accuracy levels for digits; on fashion-mnist each is 0.10 lower "
        "(the claims show the level used)."
        if any(r["dataset"] == "fashion-mnist" for r in records)
        else ""
    )
    md = [
        f"# normlab lab report\n\nnormlab {__version__}, {stamp}. {passed}/{len(rows)} claims pass."
        f"{levels}\n",
        "## Claims\n",
        _md_table(_HEAD, rows),
        "",
    ]
    body = [
        f"<h1>normlab lab report</h1><p class=note>normlab {__version__}, {stamp}. "
        f"<b>{passed}/{len(rows)}</b> claims pass.{html.escape(levels)}</p><h2>Claims</h2><table><thead><tr>"
        + "".join(f"<th>{h}</th>" for h in _HEAD)
        + "</tr></thead><tbody>"
    ]
    body += [
        "<tr>"
        + "".join(
            f"<td class={c}>{html.escape(c)}</td>" if i == 5 else f"<td>{html.escape(c)}</td>"
            for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    ]
    body.append("</tbody></table>")
    for rec in records:
        exp = REGISTRY.get(rec["experiment"])
        if exp is None:
            continue
        results = load_results(out, rec)
        plot_dir = out / rec["experiment"] / rec["dataset"] / "plots"
        try:
            pngs = exp.plot(results, plot_dir)
        except Exception as exc:  # a broken figure must not cost the report
            pngs = []
            md.append(f"> plot failed: {type(exc).__name__}: {exc}\n")
        try:
            table = exp.table(results)
        except Exception as exc:  # e.g. results stored by an older version: report, do not crash
            table = f"> table failed: {type(exc).__name__}: {exc}"
        title = f"{exp.name} — {rec['dataset']}" + (" (quick)" if rec.get("quick") else "")
        exp_rows = claims_rows([rec])
        md += [
            f"## {title}\n",
            f"**Paper:** {exp.paper}. {exp.summary}\n",
            f"**The paper's numbers:** {exp.paper_numbers}\n",
            f"**Our setup:** {exp.setup} Seeds: {rec['seeds']}.\n",
            _md_table(_HEAD, exp_rows),
            "",
            table,
            "",
        ]
        md += [f"![{p.stem}]({p.relative_to(out)})\n" for p in pngs]
        body += [
            f"<h2>{html.escape(title)}</h2>",
            f"<p><b>Paper:</b> {html.escape(exp.paper)}. {html.escape(exp.summary)}</p>",
            f"<p><b>The paper's numbers:</b> {html.escape(exp.paper_numbers)}</p>",
            f"<p><b>Our setup:</b> {html.escape(exp.setup)} Seeds: {rec['seeds']}.</p>",
            _html_table_from_md(_md_table(_HEAD, exp_rows)),
            _html_table_from_md(table),
        ]
        for p in pngs:
            data = base64.b64encode(p.read_bytes()).decode()
            body.append(
                f'<p><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}"></p>'
            )
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text("\n".join(md))
    html_path.write_text(
        f"<!doctype html><html><head><meta charset=utf-8><title>normlab lab report</title>"
        f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>"
    )
    return md_path, html_path
