"""``normlab lab report`` and ``check``: the claims with their intervals and verdicts, as a Markdown report,
a self-contained HTML page (PNGs embedded) and machine-readable rows."""

from __future__ import annotations

import base64
import html
import json
import math
import re
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .experiments import REGISTRY
from .experiments._claims import BOOTSTRAP_RESAMPLES, LEVEL_TEXT
from .experiments._common import MODEL_LABELS, num
from .runner import load_claims, load_results
from .store import LabWarning

__all__ = ["CHECK_FIELDS", "check_rows", "claims_rows", "provenance_of", "write_report"]

#: The fields of one ``normlab lab check --json`` object, in order.
CHECK_FIELDS = (
    "experiment",
    "claim",
    "kind",
    "dataset",
    "model",
    "n",
    "estimate",
    "ci_low",
    "ci_high",
    "threshold",
    "op",
    "paper_value",
    "verdict",
)

_REQUIRED = {"claim", "n", "estimate", "ci_low", "ci_high", "threshold", "verdict"}


def check_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One dict per claim with :data:`CHECK_FIELDS` (non-finite numbers as ``None``)."""

    def finite(x: Any) -> float | None:
        return float(x) if x is not None and math.isfinite(float(x)) else None

    rows = []
    for rec in records:
        for c in rec["claims"]:
            claim = c["claim"]
            rows.append(
                {
                    "experiment": rec["experiment"],
                    "claim": claim["name"],
                    "kind": claim.get("kind", "claim"),
                    "dataset": rec["dataset"],
                    "model": claim.get("model", "mlp"),  # claims written before the field: MLPs
                    "n": int(c["n"]),
                    "estimate": finite(c["estimate"]),
                    "ci_low": finite(c["ci_low"]),
                    "ci_high": finite(c["ci_high"]),
                    "threshold": finite(c["threshold"]),
                    "op": claim["op"],
                    "paper_value": claim.get("paper_value", ""),
                    "verdict": c["verdict"],
                }
            )
    return rows


def _interval(c: dict[str, Any]) -> str:
    lo, hi = c.get("ci_low"), c.get("ci_high")
    if lo is None and hi is None:  # ±inf are stored as null: no interval
        return "— (no interval)"
    return f"[{num(lo) if lo is not None else '−∞'}, {num(hi) if hi is not None else '∞'}]"


def _threshold(claim: dict[str, Any], value: float) -> str:
    op = {"within": "|x| <", ">=": "≥", "<=": "≤"}.get(claim["op"], claim["op"])
    return f"{op} {num(value)} ({claim.get('threshold_origin', 'ours')})"


def claims_rows(records: Sequence[dict[str, Any]], *, kind: str | None = None) -> list[list[str]]:
    """Table rows: experiment, dataset, model, claim, n, estimate, 95 % interval, threshold, paper value,
    verdict."""
    rows = []
    for rec in records:
        for c in rec["claims"]:
            claim = c["claim"]
            if kind is not None and claim.get("kind", "claim") != kind:
                continue
            note = f" ({c['note']})" if c.get("note") else ""
            rows.append(
                [
                    rec["experiment"],
                    rec["dataset"] + (" (quick)" if rec.get("quick") else ""),
                    MODEL_LABELS.get(claim.get("model", "mlp"), claim.get("model", "mlp")),
                    claim["statement"],
                    str(c["n"]),
                    num(c["estimate"]),
                    _interval(c),
                    _threshold(claim, c["threshold"]),
                    claim.get("paper_value", ""),
                    c["verdict"] + note,
                ]
            )
    return rows


HEAD = [
    "experiment",
    "dataset",
    "model",
    "claim",
    "n",
    "estimate",
    f"{LEVEL_TEXT} interval",
    "threshold",
    "paper's value",
    "verdict",
]

STATISTICS = (
    f"Every claim is a statistic over seeds with a {LEVEL_TEXT} interval: a mean of per-seed values "
    "(paired differences where arms are compared) with Student's t interval; per-seed ratios averaged "
    "on the log scale (the estimate is their geometric mean, the interval exp of the t interval of the "
    "logs); a rate k/n with Wilson's interval; or a statistic of the whole set of seeds (a ratio of "
    "means, the largest trainable learning rate) with a percentile bootstrap over seeds "
    f"({BOOTSTRAP_RESAMPLES} resamples, arms resampled together). *confirmed*: the whole interval is on "
    "the claimed side of the threshold; *refuted*: wholly on the other side; *inconclusive*: otherwise, "
    "or when a seed has no value, or when a bound (a run censored at its budget) could overturn the "
    "verdict. Thresholds marked (paper) are read from the paper; (ours) are our choice. Sanity checks "
    "hold by construction and are listed apart; they are not reproductions. Seeds are random draws: "
    "a seed's numbers can change when it trains in a batch with different seeds."
)


def _md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]], verdict_col: int | None) -> str:
    out = [
        "<table><thead><tr>"
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr></thead><tbody>"
    ]
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            cls = f" class={c.split()[0]}" if i == verdict_col and c else ""
            cells.append(f"<td{cls}>{html.escape(c)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</tbody></table>"


def _html_table_from_md(md: str) -> str:
    """A pipe table (as experiments' ``table()`` return) rendered as HTML, with any text after it."""
    lines = md.strip().splitlines()
    table = [ln.strip() for ln in lines if ln.strip().startswith("|")]
    rest = [ln for ln in lines if ln.strip() and not ln.strip().startswith("|")]
    if len(table) < 2:
        return f"<p>{html.escape(md)}</p>" if md.strip() else ""
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in table]
    body = [r for r in cells[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
    text = "".join(f"<p>{html.escape(ln)}</p>" for ln in rest)
    return _html_table(cells[0], body, None) + text


def _unit_records(out: Path, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished units' ``result.json`` records (damaged ones left out)."""
    base = Path(out) / rec["experiment"] / rec["dataset"]
    found = []
    for unit in rec.get("units", []):
        try:
            found.append(json.loads((base / unit / "result.json").read_text()))
        except (OSError, ValueError):
            continue
    return found


def provenance_of(out: Path, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What produced the results: normlab version and git commit, torch, threads, datasets, seeds, and
    the training time summed over units (each value a list of the distinct values found)."""
    seen: dict[str, set[str]] = {k: set() for k in ("normlab", "git_commit", "torch", "threads")}
    seconds = 0.0
    for rec in records:
        for unit in _unit_records(out, rec):
            prov = unit.get("provenance") or {}
            for key in seen:
                if prov.get(key) is not None:
                    seen[key].add(str(prov[key]))
            seconds += float(unit.get("seconds") or 0.0)
    return {
        **{k: sorted(v) or ["unknown"] for k, v in seen.items()},
        "datasets": sorted(
            {r["dataset"] + (" (quick)" if r.get("quick") else "") for r in records}
        ),
        "seeds": sorted({len(r.get("seeds", [])) for r in records}),
        "seconds": seconds,
    }


def _provenance_line(p: dict[str, Any]) -> str:
    commit = ", ".join(c[:12] for c in p["git_commit"])
    minutes = p["seconds"] / 60
    return (
        f"normlab {', '.join(p['normlab'])} (git {commit}), torch {', '.join(p['torch'])}, "
        f"{', '.join(p['threads'])} thread(s); data: {', '.join(p['datasets'])}; seeds per experiment: "
        f"{', '.join(map(str, p['seeds']))}; training time {minutes:.1f} min (sum over units)."
    )


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3}.confirmed{color:#126b12;font-weight:bold}.refuted{color:#b00020;font-weight:bold}
.inconclusive{color:#a06000;font-weight:bold}img{max-width:100%;border:1px solid #eee}.note{color:#555}"""


def write_report(out: Path) -> tuple[Path, Path]:
    """Write ``<out>/report.md`` and ``<out>/report.html`` from every experiment's claims and results."""
    out = Path(out)
    with warnings.catch_warnings(record=True) as caught:  # damaged, foreign or older-format files
        warnings.simplefilter("always", LabWarning)
        records = load_claims(out)
    skipped = [str(w.message) for w in caught if issubclass(w.category, LabWarning)]
    for message in skipped:  # still said where the caller shows them, and listed in the report
        warnings.warn(message, LabWarning, stacklevel=2)
    if not records:
        raise FileNotFoundError(
            f"no experiment results under {out}: run `normlab lab run ...` first"
        )
    prov = _provenance_line(provenance_of(out, records))
    claims = claims_rows(records, kind="claim")
    sanity = claims_rows(records, kind="sanity")
    counts = {
        v: sum(r[-1].startswith(v) for r in claims)
        for v in ("confirmed", "refuted", "inconclusive")
    }
    summary = (
        f"{len(claims)} claims: {counts['confirmed']} confirmed, {counts['refuted']} refuted, "
        f"{counts['inconclusive']} inconclusive; {len(sanity)} sanity checks."
    )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    levels = (
        " Absolute accuracy levels are written for digits; on fashion-mnist each is 0.10 lower (the "
        "claims show the level used)."
        if any(r["dataset"] == "fashion-mnist" for r in records)
        else ""
    )
    skipped_md = "".join(f"\n\n> skipped: {s}" for s in skipped)
    md = [
        f"# normlab lab report\n\n{stamp}. {prov}\n\n**{summary}**{levels}{skipped_md}\n",
        f"{STATISTICS}\n",
        "## Claims\n",
        _md_table(HEAD, claims),
        "\n## Sanity checks (hold by construction)\n",
        _md_table(HEAD, sanity),
        "",
    ]
    body = [
        f"<h1>normlab lab report</h1><p class=note>{html.escape(stamp)}. {html.escape(prov)}</p>"
        f"<p><b>{html.escape(summary)}</b>{html.escape(levels)}</p>"
        + "".join(f"<p class=note>skipped: {html.escape(s)}</p>" for s in skipped)
        + f"<p class=note>{html.escape(STATISTICS)}</p><h2>Claims</h2>",
        _html_table(HEAD, claims, len(HEAD) - 1),
        "<h2>Sanity checks (hold by construction)</h2>",
        _html_table(HEAD, sanity, len(HEAD) - 1),
    ]
    detail_head = [
        "claim",
        "kind",
        "n",
        "estimate",
        f"{LEVEL_TEXT} interval",
        "threshold",
        "method",
        "verdict",
    ]
    for rec in records:
        exp = REGISTRY.get(rec["experiment"])
        if exp is None:
            continue
        try:
            results = load_results(out, rec)
        except (OSError, ValueError, KeyError) as exc:  # a damaged unit: report what is there
            md.append(f"> results unreadable: {type(exc).__name__}: {exc}\n")
            continue
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
        detail = [
            [
                c["claim"]["statement"],
                c["claim"].get("kind", "claim"),
                str(c["n"]),
                num(c["estimate"]),
                _interval(c),
                _threshold(c["claim"], c["threshold"]),
                c.get("method", "") + (f"; {c['note']}" if c.get("note") else ""),
                c["verdict"],
            ]
            for c in rec["claims"]
        ]
        seeds = f"{len(rec.get('seeds', []))} seeds ({', '.join(map(str, rec.get('seeds', [])))})"
        md += [
            f"## {title}\n",
            f"**Paper:** {exp.paper}. {exp.summary}\n",
            f"**The paper's numbers:** {exp.paper_numbers}\n",
            f"**Our setup:** {exp.setup} {seeds}.\n",
            _md_table(detail_head, detail) if detail else "No claim: reported only.",
            "",
            table,
            "",
        ]
        md += [f"![{p.stem}]({p.relative_to(out)})\n" for p in pngs]
        body += [
            f"<h2>{html.escape(title)}</h2>",
            f"<p><b>Paper:</b> {html.escape(exp.paper)}. {html.escape(exp.summary)}</p>",
            f"<p><b>The paper's numbers:</b> {html.escape(exp.paper_numbers)}</p>",
            f"<p><b>Our setup:</b> {html.escape(exp.setup)} {html.escape(seeds)}.</p>",
            _html_table(detail_head, detail, len(detail_head) - 1)
            if detail
            else "<p>No claim: reported only.</p>",
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
