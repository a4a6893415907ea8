"""The promotion decisions a retraining run reports: one dict per variant (see
:func:`rcnnops.registry.decision_dict`), a word for each, and their table."""

from __future__ import annotations


def unchanged(reg: dict) -> dict:
    """No new model version, so no new decision (the audit trail stays as it was)."""
    return {
        "name": reg["name"],
        "version": reg["version"],
        "unchanged": True,  # neither promoted nor kept: not decided again
        "promoted": False,
        "reason": "model unchanged since its registration; no new decision",
        "metric": None,
        "value": None,
        "champion_before": None,
        "champion_value": None,
    }


def decision_word(d: dict) -> str:
    """promoted, kept (the gate kept the champion) or unchanged (not decided again)."""
    return "unchanged" if d.get("unchanged") else "promoted" if d["promoted"] else "kept"


def summary(decisions: list[dict]) -> str:
    """The run's decisions as a Markdown table (its Prefect artifact)."""
    from rcnnops.tables import markdown_table

    columns = ("model", "version", "decision", "metric", "value", "reason")
    rows = [
        [
            d["name"],
            str(d["version"]),
            decision_word(d),
            d["metric"] or "-",
            "n/a" if d["value"] is None else f"{d['value']:.4f}",
            d["reason"],
        ]
        for d in decisions
    ]
    return markdown_table(columns, rows)
