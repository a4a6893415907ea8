"""Descriptions the MLflow UI shows on registered models and versions, written
from the versions' own tags (so they never disagree with them): what the model
is, what it was trained and measured on, and the promotion gate's latest word."""

from __future__ import annotations

from rcnnops import tracking
from rcnnops.registry.store import rolled_back

METRICS = ("bbox_AP", "bbox_AP50", "segm_AP", "segm_AP50")


def model_description(variant: str) -> str:
    return (
        f"rcnnops `{variant}` detector (torchvision detection API: boxes, labels, scores"
        + (", masks" if variant == "mask_rcnn" else "")
        + "). Each version is a pyfunc trained by the `train@"
        + variant
        + "` DVC stage and measured by `evaluate@"
        + variant
        + "` on the prepared validation split. Alias `champion` is what `rcnnops serve` "
        "follows; `challenger` is the newest candidate. The promotion gate moves "
        "`champion` only to a version that beats it on the gate's metric "
        "(`register.metric` in params.yaml) on the same validation data."
    )


def version_description(tags: dict[str, str]) -> str:
    variant = tags.get("variant", "?")
    measured = ", ".join(
        f"{k} {float(tags[f'metric.{k}']):.4f}" for k in METRICS if f"metric.{k}" in tags
    )
    lines = [
        f"`{variant}` trained on data {tags.get('data_hash', '?')} with params "
        f"{tags.get('params_hash', '?')} (commit {tags.get('git_commit', '?')[:12]}).",
        f"Measured on validation data {tags.get('val_hash', '?')}: {measured or 'no metrics'}.",
    ]
    decision = tags.get("promotion.decision")
    if decision:
        lines.append(
            f"Gate: {decision}, {tags.get('promotion.reason', '')} "
            f"(by {tags.get('promotion.by', '?')}, {tags.get('promotion.at', '?')})."
        )
    else:
        lines.append("Gate: not decided yet.")
    if rolled_back(tags):
        lines.append(
            f"Rolled back to v{tags.get('rollback.demoted_to', '?')} by "
            f"{tags.get('rollback.demoted_by', '?')} "
            f"({tags.get('rollback.demoted_at')})."
        )
    return "\n\n".join(lines)


def describe(name: str, version: str) -> None:
    """Rewrite ``name`` v``version``'s description (and the model's, when empty)."""
    client = tracking.client()
    mv = client.get_model_version(name, str(version))
    client.update_model_version(name, str(version), description=version_description(mv.tags))
    if not client.get_registered_model(name).description:
        variant = mv.tags.get("variant", name.removeprefix("rcnnops-"))
        client.update_registered_model(name, description=model_description(variant))
