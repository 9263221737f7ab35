"""The Markdown form of the selftest report (``report.md``; ``report.json`` is the same dict as JSON)."""

from __future__ import annotations

import json


def _table(title: str, header: str, rule: str) -> list[str]:
    """The opening lines of a report section that is a Markdown table."""
    return ["", f"## {title}", "", header, rule]


def to_markdown(report: dict) -> str:
    lines = ["# addernet-selftest report", ""]
    lines.append(
        f"{report['date']} · {report['device']['name']} · "
        f"{'PASSED' if report['ok'] else 'FAILED'} · {report['seconds']:.0f} s"
    )
    lines += ["", "| check | result | seconds |", "|---|---|---:|"]
    for r in report["checks"]:
        res = (
            "ok"
            if r["ok"]
            else "**FAILED**: " + r["error"][:200].replace("|", "\\|").replace("\n", " ")
        )
        lines.append(f"| {r['name']} | {res} | {r['seconds']:.1f} |")
    passed = {r["name"]: r.get("details") for r in report["checks"] if r["ok"]}  # the passed checks' details
    if "env" in passed:
        lines += _table("Environment", "| | |", "|---|---|")
        lines += [f"| {k} | {v} |" for k, v in passed["env"].items()]
    if "kernels" in passed:
        d = passed["kernels"]
        header = "| code path | max error / max \\|reference\\| |"
        lines += _table(f"Kernels vs the reference ({d['mode']})", header, "|---|---|")
        for row in d["cases"]:
            errs = ", ".join(f"{k} {v:.1e}" for k, v in row["errors"].items())
            lines.append(f"| {row['case']} | {errs} |")
    if "speed" in passed:
        d = passed["speed"]
        lines += _table(
            f"Forward vs cuDNN conv2d (fp32, TF32 off), batch {d['batch']}",
            "| layer | ×model | adder ms | conv ms | conv/adder time | adder T MAC/s | of FP32 roofline |",
            "|---|---:|---:|---:|---:|---:|---:|",
        )
        for r in d["rows"]:
            frac = f"{100 * r['roofline_fraction']:.0f} %" if r["roofline_fraction"] else "–"
            lines.append(
                f"| {r['layer']} | {r['count']} | {r['adder_ms']:.3f} | {r['conv_ms']:.3f} | "
                f"{r['conv_over_adder']:.2f} | {r['adder_tmacs']:.2f} | {frac} |"
            )
        dw = d.get("dw_rows") or []
        if dw:
            tiles = [k for k in dw[0] if k.startswith("dw_ms[")]
            lines += _table(
                f"∂F (deterministic) candidate tiles, batch {d['batch']}",
                "| layer | ×model | " + " | ".join(f"{t[6:-1]} ms" for t in tiles) + " | fastest |",
                "|---|---:|" + "---:|" * len(tiles) + "---|",
            )
            for r in dw:
                ms = " | ".join(f"{r[t]:.3f}" for t in tiles)
                lines.append(f"| {r['layer']} | {r['count']} | {ms} | {r['dw_fastest']} |")
    for nm in ("train", "deepspeed"):
        if nm in passed:
            lines += ["", f"## {nm} smoke", "", "```", json.dumps(passed[nm], indent=1), "```"]
    return "\n".join(lines) + "\n"
