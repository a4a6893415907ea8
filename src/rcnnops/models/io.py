"""Model files: a trained model's ``model.pt`` (a plain state dict, read with
``weights_only=True``) and ``model.json`` (everything needed to rebuild and trace
it: variant, builder params, labels, data/params hashes, MLflow run id, timings).

What ``rcnnops models``, evaluation and the served model load; no training code here.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rcnnops.errors import UserError
from rcnnops.files import write_atomic

if TYPE_CHECKING:  # torch loads with the weights: reading model.json needs none
    import torch
    from torch import nn


class CheckpointError(UserError, RuntimeError):
    """A checkpoint or model file cannot be loaded (corrupt, truncated, or not
    ours). ``summary`` is the file and the cause, without the advice."""

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary or message


_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def describe_load_error(e: BaseException) -> str:
    """One line on why ``torch.load`` failed. Torch's own text runs to paragraphs
    and suggests ``weights_only=False``, which must never be the fix here."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if isinstance(e, pickle.UnpicklingError):
        detail = next((ln for ln in lines if not ln.startswith(_TORCH_BOILERPLATE)), "")
        return "not plain tensors, refused by weights-only loading" + (
            f": {detail[:200]}" if detail else ""
        )
    if isinstance(e, EOFError):
        return "empty or truncated file"
    first = lines[0].split(". ")[0] if lines else ""
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def save_model(model: nn.Module, out_dir: Path, meta: dict) -> None:
    """``model.pt`` (state dict) and ``model.json`` (meta), each written atomically."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "model.pt.tmp"
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    os.replace(tmp, out_dir / "model.pt")
    write_atomic(out_dir / "model.json", json.dumps(meta, indent=2))


REQUIRED_META = ("variant", "num_classes", "model_params")


def _rebuild_hint(path: Path, variant: str) -> str:
    if Path(path).parent.name == "model_dir":  # a registered version's bundle (pyfunc.log)
        variant = "VARIANT" if variant == "model_dir" else variant
        return (
            f"this registered version's files are damaged: promote another version "
            f"(`rcnnops promote {variant} N --force`) or register a good model again "
            f"(`rcnnops register {variant}` from models/{variant})"
        )
    return (
        f"restore it from the DVC cache with `dvc checkout {path}`, or rebuild it with "
        f"`dvc repro -f train@{variant}`"
    )


def read_model_meta(model_dir: Path) -> dict:
    """``model.json`` of a trained model folder (``models/<variant>``)."""
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no trained model here; train it with `dvc repro train@<variant>`"
        )
    try:
        meta: Any = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        meta = e
    if not isinstance(meta, dict):
        why = f" ({meta})" if isinstance(meta, Exception) else ""
        raise CheckpointError(
            f"{path} is corrupt{why}: {_rebuild_hint(path, Path(model_dir).name)}"
        )
    require_meta(meta, path, REQUIRED_META)
    return meta


def require_meta(meta: dict, path: Path, keys: tuple[str, ...]) -> None:
    """:class:`CheckpointError` naming the file and the keys ``meta`` lacks."""
    missing = [k for k in keys if k not in meta]
    if missing:
        variant = meta.get("variant") or Path(path).parent.name
        raise CheckpointError(
            f"{path} is incomplete (no {', '.join(missing)}): {_rebuild_hint(path, variant)}"
        )


def load_model(
    model_dir: Path, device: torch.device | str = "cpu", svd_rank: int | None = None
) -> tuple[nn.Module, dict]:
    """Rebuild a trained model from ``model.json`` + ``model.pt`` (weights only), in
    eval mode on ``device``. ``svd_rank``: replace the box head's FC layers by their
    truncated SVD of that rank (Fast R-CNN, section 3.1: faster inference, no
    retraining). A truncated, garbage or mismatched ``model.pt`` raises
    :class:`CheckpointError` naming it and how to get it back."""
    import torch

    from rcnnops.models import build_model
    from rcnnops.models.roi import compress

    model_dir = Path(model_dir)
    meta = read_model_meta(model_dir)
    builder_params = dict(meta["model_params"])
    # Models trained before svd_rank became a loading setting carry it in their params.
    legacy_rank = builder_params.pop("svd_rank", None)
    svd_rank = svd_rank if svd_rank is not None else legacy_rank
    model = build_model(meta["variant"], meta["num_classes"], builder_params)
    path = model_dir / "model.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise CheckpointError(
            f"{path}: cannot load model weights ({describe_load_error(e)}); "
            + _rebuild_hint(path, meta["variant"])
        ) from None
    if svd_rank is not None:
        try:
            compress(model, svd_rank)
        except ValueError as e:  # R-CNN: no FC layer in its per-crop box head
            print(f"svd_rank {svd_rank}: {e}; {meta['variant']} runs uncompressed", file=sys.stderr)
    return model.to(device).eval(), meta
