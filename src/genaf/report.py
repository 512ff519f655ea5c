"""Markdown tables from metrics files."""

from __future__ import annotations

import json
from pathlib import Path


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def demo_table(results: dict[str, dict], attack_order: list[str] | None = None) -> str:
    """A methods × attacks table of clean accuracy and robust accuracy (percent)."""
    attacks: list[str] = []
    for m in results.values():
        for a in m.get("robust_acc", {}):
            if a not in attacks:
                attacks.append(a)
    if attack_order:
        attacks = [a for a in attack_order if a in attacks] + [a for a in attacks if a not in attack_order]
    head = (
        "| method | clean acc | "
        + " | ".join(f"RA {a}" for a in attacks)
        + " | weight drift | epochs | passes/img | checks |"
    )
    sep = "|" + "---|" * (len(attacks) + 6)
    rows = [head, sep]
    for name, m in results.items():
        ra = m.get("robust_acc", {})
        drift = m.get("weight_drift")
        epochs, passes = budget_cells(m)
        rows.append(
            f"| {name} | {_pct(m['clean_acc'])} | "
            + " | ".join(_pct(ra.get(a)) for a in attacks)
            + f" | {'—' if drift is None else f'{drift:.3f}'} | {epochs} | {passes} | {checks_flag(m)} |"
        )
    return "\n".join(rows)


def budget_cells(m: dict) -> tuple[str, str]:
    """(total epochs, encoder passes per training image during training) of a run's metrics."""
    b = m.get("budget") or {}
    passes = (b.get("encoder_passes_per_train_image") or {}).get("train") or {}
    epochs = "—" if b.get("total_epochs") is None else str(b["total_epochs"])
    return epochs, (f"{sum(passes.values()):.1f}" if passes else "—")


def checks_flag(m: dict) -> str:
    """'ok', '—' (no checks recorded) or '**FAILED**: names' for a report cell."""
    checks = m.get("checks")
    if not checks:
        return "—"
    failed = checks.get("failed", [])
    return f"**FAILED**: {', '.join(failed)}" if failed else "ok"


def load_metrics(run_dirs: dict[str, Path]) -> dict[str, dict]:
    return {k: json.loads((Path(v) / "metrics.json").read_text()) for k, v in run_dirs.items()}
