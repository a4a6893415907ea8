"""[stage] prepare: validate a COCO dataset, fix labels, write the prepared splits.

Outputs (``prepare.out``, default ``data/prepared/``):

- ``train.json``, ``val.json``: validated COCO instances (original category
  ids, boxes clipped within tolerance) plus ``"rcnnops": {"image_root": ...}``.
- ``labels.json``: category id <-> contiguous label 1..K, with names.
- ``manifest.json``: counts, what validation did, and content hashes
  (``data_hash`` of both splits, ``val_hash`` of the validation split: JSON and
  image bytes), which every later stage records as lineage, and the sha256 of
  each file above, checked by :func:`load_split` (a damaged file is refused,
  saying how to rebuild it).

Nothing is written unless the whole dataset validates.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np

from rcnnops.config import DataParams, PrepareParams
from rcnnops.data.io import DataError, read_json, safe_image_path, short
from rcnnops.data.labels import LabelMap
from rcnnops.data.validate import validate_coco
from rcnnops.files import replaced_dir, sha256_bytes, sha256_file

SPLITS = ("train", "val")


def _split_hash(coco: dict, image_root: Path) -> str:
    """sha256 over the canonical annotations and every image's bytes."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {k: coco[k] for k in ("images", "annotations", "categories")}, sort_keys=True
        ).encode()
    )
    for im in sorted(coco["images"], key=lambda r: r["id"]):
        path = safe_image_path(image_root, im["file_name"], f"image id {im['id']}")
        h.update(im["file_name"].encode())
        h.update(bytes.fromhex(sha256_file(path)))
    return h.hexdigest()


def _subset(coco: dict, image_ids: set[int]) -> dict:
    out = {k: v for k, v in coco.items() if k not in ("images", "annotations")}
    out["images"] = [im for im in coco["images"] if im["id"] in image_ids]
    out["annotations"] = [a for a in coco["annotations"] if a["image_id"] in image_ids]
    return out


def split_train_val(coco: dict, val_fraction: float, seed: int) -> tuple[dict, dict]:
    """Deterministic image-level split (same ids + seed -> same split)."""
    ids = sorted(im["id"] for im in coco["images"])
    order = np.random.default_rng(seed).permutation(len(ids))
    n_val = max(1, round(len(ids) * val_fraction))
    if n_val >= len(ids):
        raise DataError(f"cannot split {len(ids)} image(s) into train and val")
    val_ids = {ids[i] for i in order[:n_val]}
    return _subset(coco, set(ids) - val_ids), _subset(coco, val_ids)


def _display_path(path: Path) -> str:
    """Project-relative when inside the project (portable), else absolute."""
    path = path.resolve()
    cwd = Path.cwd().resolve()
    return os.path.relpath(path, cwd) if path.is_relative_to(cwd) else str(path)


def _read_split(data: DataParams, split: str, p: PrepareParams) -> tuple[dict, Path, dict]:
    source = getattr(data, split)
    root = Path(data.root)
    ann_path, image_root = root / source.annotations, root / source.images
    if not image_root.is_dir():
        raise DataError(f"{ann_path}: image folder {image_root} not found")
    coco, report = validate_coco(
        read_json(ann_path),
        ann_path,
        image_root,
        drop_degenerate=p.drop_degenerate,
        box_tolerance=p.box_tolerance,
        max_image_pixels=p.max_image_pixels,
    )
    return coco, image_root, asdict(report)


def _refuse_shared_images(data: DataParams, train: dict, train_root: Path, val: dict,
                          val_root: Path) -> None:  # fmt: skip
    """A photo in both splits is validated on after being trained on: its AP says
    nothing about new photos. Same file (resolved, as validation resolved it; every
    file lies inside its resolved image folder, so folders apart share none)."""
    a, b = train_root.resolve(), val_root.resolve()
    if not (a.is_relative_to(b) or b.is_relative_to(a)):
        return
    trained = {(train_root / im["file_name"]).resolve(): im["id"] for im in train["images"]}
    for im in val["images"]:
        iid = trained.get((val_root / im["file_name"]).resolve())
        if iid is not None:
            raise DataError(
                f"{Path(data.root) / data.val.annotations}: image id {im['id']} "
                f"({short(im['file_name'])}) is also in the train split (image id {iid} of "
                f"{Path(data.root) / data.train.annotations}): a photo trained on inflates "
                "the validation AP; keep it in one split"
            )


def prepare(data: DataParams, p: PrepareParams) -> dict:
    """Validate ``data`` and write ``p.out`` atomically. Returns the manifest."""
    train, train_root, train_report = _read_split(data, "train", p)
    reports = {"train": train_report}
    if data.val is None:
        train, val = split_train_val(train, p.val_fraction, p.seed)
        roots = {"train": train_root, "val": train_root}
    else:
        val, val_root, reports["val"] = _read_split(data, "val", p)
        roots = {"train": train_root, "val": val_root}
        _refuse_shared_images(data, train, train_root, val, val_root)
        a = sorted((c["id"], c["name"]) for c in train["categories"])
        b = sorted((c["id"], c["name"]) for c in val["categories"])
        if a != b:
            raise DataError(
                f"{Path(data.root) / data.val.annotations}: categories differ from the train "
                "split's; both splits need the same category ids and names"
            )
    labels = LabelMap.from_categories(train["categories"])
    splits = {"train": train, "val": val}
    hashes = {s: _split_hash(splits[s], roots[s]) for s in SPLITS}
    manifest = {
        "data_hash": sha256_bytes(hashes["train"] + hashes["val"]),
        "val_hash": hashes["val"],
        "source": _display_path(Path(data.root)),
        "num_classes": labels.num_classes,
        "splits": {
            s: {
                "images": len(splits[s]["images"]),
                "annotations": len(splits[s]["annotations"]),
                "hash": hashes[s],
            }
            for s in SPLITS
        },
        "validation": reports,
        "files": {},
    }
    with replaced_dir(Path(p.out), ".prepare-") as tmp:
        for s in SPLITS:
            doc = dict(splits[s], rcnnops={"image_root": _display_path(roots[s]), "split": s})
            text = json.dumps(doc)
            (tmp / f"{s}.json").write_text(text)
            manifest["files"][f"{s}.json"] = sha256_bytes(text)
        text = json.dumps(labels.to_json(), indent=2)
        (tmp / "labels.json").write_text(text)
        manifest["files"]["labels.json"] = sha256_bytes(text)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


REBUILD = "rebuild it with `dvc repro prepare` (or `rcnnops prepare`)"


def _manifest_problem(m: object) -> str | None:
    """What is wrong with a parsed manifest, or None. ``data_hash`` must still
    be the hash of the two splits' hashes (a hand-edited manifest is caught)."""
    if not isinstance(m, dict):
        return "not a JSON object"
    splits, files = m.get("splits"), m.get("files")
    if not isinstance(splits, dict) or not isinstance(files, dict):
        return "'splits' or 'files' missing"
    hashes = [splits[s].get("hash") if isinstance(splits.get(s), dict) else None for s in SPLITS]
    if not all(isinstance(h, str) for h in hashes):
        return f"a split hash is missing (splits: {sorted(splits)})"
    if m.get("data_hash") != sha256_bytes("".join(hashes)):
        return "'data_hash' does not match the splits' hashes"
    if m.get("val_hash") != splits["val"]["hash"]:
        return "'val_hash' does not match the val split's hash"
    return None


def load_manifest(prepared: Path) -> dict:
    """``prepared``'s manifest, checked for shape and consistency (see :func:`prepare`)."""
    path = Path(prepared) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path}: prepared data not found; {REBUILD}")
    try:
        manifest = read_json(path)
    except DataError as e:
        raise DataError(f"{e}; {REBUILD}") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise DataError(f"{path}: corrupt or edited by hand: {problem}; {REBUILD}")
    return manifest


def _read_checked(prepared: Path, name: str, manifest: dict, required: bool = True) -> object:
    """Parse ``prepared/name`` after checking its sha256 against the manifest."""
    path = prepared / name
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: prepared file not found; {REBUILD}") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}; {REBUILD}") from None
    expected = manifest["files"].get(name)
    if (required or expected is not None) and expected != sha256_bytes(text):
        raise DataError(
            f"{path}: checksum does not match {prepared / 'manifest.json'} "
            f"(file corrupt or edited by hand); {REBUILD}"
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path}: not valid JSON ({e}); {REBUILD}") from None


def load_split(prepared: Path, split: str) -> tuple[dict, Path, LabelMap]:
    """A prepared split: (COCO dict, image root, labels), checked against the manifest.

    Any damage (missing, truncated or edited files) raises :class:`DataError`
    naming the file and how to rebuild it."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    prepared = Path(prepared)
    manifest = load_manifest(prepared)
    path = prepared / f"{split}.json"
    coco = _read_checked(prepared, f"{split}.json", manifest)
    meta = coco.get("rcnnops") if isinstance(coco, dict) else None
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("image_root"), str)
        or any(not isinstance(coco.get(k), list) for k in ("images", "annotations", "categories"))
    ):
        raise DataError(f"{path}: not a prepared COCO split; {REBUILD}")
    # labels.json is checksummed since this check exists; older manifests lack its sum.
    raw_labels = _read_checked(prepared, "labels.json", manifest, required=False)
    try:
        labels = LabelMap.from_json(raw_labels)
        if labels.num_classes == 0 or any(not isinstance(c, int) for c in labels.category_ids):
            raise TypeError("no labels or a non-integer category id")
    except (KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{prepared / 'labels.json'}: not a label map ({e}); {REBUILD}") from None
    return coco, Path(meta["image_root"]), labels


def run(params) -> dict:
    """The stage: ``prepare`` with the project's params; prints what it did."""
    manifest = prepare(params.data, params.prepare)
    for split, info in manifest["splits"].items():
        rep = manifest["validation"].get(split, {})
        extra = ""
        if rep.get("dropped_degenerate"):
            extra += f", dropped {rep['dropped_degenerate']} degenerate box(es)"
        if rep.get("clipped"):
            extra += f", clipped {rep['clipped']} box(es) to the image"
        if rep.get("empty_polygons"):
            extra += f", {rep['empty_polygons']} box-only ('segmentation': [[]])"
        print(f"{split}: {info['images']} images, {info['annotations']} annotations{extra}")
    print(f"data_hash {manifest['data_hash'][:12]}  -> {params.prepare.out}")
    return manifest


def find_coco_splits(root: Path) -> dict:
    """The ``data:`` params for a COCO folder laid out as COCO itself is.

    ``root/annotations/instances_<split>.json`` with images in ``root/<split>``
    (or ``root/images/<split>``, or ``root/images``); a ``val``-like split
    (``val``, ``val2017``, ``validation``...) becomes ``val``, the other one
    ``train``. With a single annotation file, ``val`` is ``None`` (``prepare``
    splits one off). Raises :class:`DataError` saying what was expected.
    """
    root = Path(root)
    files = sorted((root / "annotations").glob("instances_*.json"))
    if not root.is_dir() or not files:
        raise DataError(
            f"{root}: no COCO annotations found; expected {root}/annotations/"
            "instances_<split>.json (e.g. instances_train2017.json) with images in "
            f"{root}/<split>/ (or point params.yaml `data:` at your files)"
        )

    def images_for(split: str) -> str:
        for cand in (split, f"images/{split}", "images"):
            if (root / cand).is_dir():
                return cand
        raise DataError(f"{root}: no image folder for split {split!r} ({root}/{split} expected)")

    splits = {f.stem.removeprefix("instances_"): f for f in files}
    val = [s for s in splits if s.startswith("val")]
    train = [s for s in splits if not s.startswith(("val", "test"))]
    if len(train) != 1 or len(val) > 1:
        raise DataError(
            f"{root}/annotations: expected one train and at most one val annotation file, "
            f"found {sorted(splits)}"
        )

    def source(split: str) -> dict:
        return {"annotations": f"annotations/{splits[split].name}", "images": images_for(split)}

    return {
        "root": str(root),
        "train": source(train[0]),
        "val": source(val[0]) if val else None,
    }
