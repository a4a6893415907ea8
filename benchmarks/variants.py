"""1. The Fast R-CNN paper's Table 4, for our four variants on the same data.

Per variant: training time per image (interleaved training steps of freshly
built models), test time per image split into proposals (selective search for
rcnn / fast_rcnn, the RPN for faster / mask), network and postprocess (box
decoding, NMS, rescaling, mask pasting and RLE encoding), parameters, and the
AP of the model the bench project trained (its ``reports/<variant>``).
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    VARIANTS,
    Context,
    Split,
    ab,
    load_params,
    load_trained,
    median_ms,
    metrics,
    now,
    stage_times,
    val_dataset,
)


def test_times(ctx: Context, models: dict) -> dict[str, dict[str, float]]:
    from rcnnops.data.io import load_image_array
    from rcnnops.metrics import to_coco_results
    from rcnnops.models import USES_PROPOSALS
    from rcnnops.proposals.selective_search import selective_search

    p = load_params(ctx.project).proposals
    dataset, _, labels = val_dataset(ctx.project, proposals=True)
    split = Split()
    for m in models.values():
        split.wrap(m.roi_heads, "postprocess_detections", "post")
        split.wrap(m.transform, "postprocess", "post")
        if hasattr(m, "rpn"):
            split.wrap(m.rpn, "forward", "proposals")
    parts: dict[str, dict[str, list[float]]] = {
        v: {"proposals": [], "network": [], "post": []} for v in VARIANTS
    }

    def one(v: str, i: int) -> None:
        image, target = dataset[i]
        props = [target["proposals"]] if v in USES_PROPOSALS else None
        with torch.no_grad():
            t0 = now()
            out = models[v]([image], proposals=props) if props else models[v]([image])
            forward = now() - t0
            t0 = now()
            to_coco_results(int(target["image_id"]), out[0], labels)
            encode = now() - t0
        s = split.take()
        parts[v]["post"].append(s.get("post", 0.0) + encode)
        parts[v]["proposals"].append(s.get("proposals", 0.0))
        parts[v]["network"].append(forward - s.get("post", 0.0) - s.get("proposals", 0.0))

    def search(i: int) -> None:
        selective_search(
            load_image_array(dataset.image_path(i)), p.mode, p.max_boxes, p.min_size, p.dedup_iou
        )

    n = min(len(dataset), ctx.pick(16, 80))
    cases = {"ss": search} | {v: (lambda i, v=v: one(v, i)) for v in VARIANTS}
    times = ab(cases, range(n))
    for v in VARIANTS:  # the warm-up image is not kept
        for k in parts[v]:
            parts[v][k] = parts[v][k][1:]
    ss = median_ms(times["ss"])
    out = {}
    for v in VARIANTS:
        med = {k: median_ms(t) for k, t in parts[v].items()}
        if v in USES_PROPOSALS:
            med["proposals"] = ss
        med["total"] = med["proposals"] + med["network"] + med["post"]
        out[v] = med
    return out


def train_times(ctx: Context) -> dict[str, float]:
    """Median ms per image of a training step (forward, backward, SGD) per variant."""
    from rcnnops.data.dataset import DetectionDataset
    from rcnnops.data.prepare import load_split
    from rcnnops.data.transforms import RandomHorizontalFlip
    from rcnnops.engine import split_proposals
    from rcnnops.models import MASK_VARIANTS, USES_PROPOSALS, build_model
    from rcnnops.proposals.precompute import ProposalStore

    params = load_params(ctx.project)
    coco, root, labels = load_split(ctx.project / params.prepare.out, "train")
    store = ProposalStore(ctx.project / params.proposals.out / "train")
    steps = {}
    for v in VARIANTS:
        vp = params.variant(v)
        torch.manual_seed(0)
        model = build_model(v, labels.num_classes + 1, vp.model).train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        data = DetectionDataset(
            coco,
            root,
            labels,
            RandomHorizontalFlip(vp.hflip),
            proposals=store.boxes_for if v in USES_PROPOSALS else None,
            masks=v in MASK_VARIANTS,
        )
        bs = vp.batch_size

        def step(i: int, model=model, opt=opt, data=data, bs=bs) -> float:
            batch = [data[(i * bs + j) % len(data)] for j in range(bs)]
            images = [b[0] for b in batch]
            targets = [b[1] for b in batch]
            props = split_proposals(targets)
            losses = model(images, targets, props) if props else model(images, targets)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()

        steps[v] = (step, bs)
    n = ctx.pick(7, 21)
    times = ab({v: s for v, (s, _) in steps.items()}, range(n))
    return {v: median_ms(times[v]) / steps[v][1] for v in VARIANTS}


def run(ctx: Context) -> dict:
    from rcnnops.models.weights import count_parameters

    models = {v: load_trained(ctx.project, v)[0] for v in VARIANTS}
    params_m = {v: count_parameters(m) / 1e6 for v, m in models.items()}  # before timing wraps
    test = test_times(ctx, models)
    train = train_times(ctx)
    stages = stage_times(ctx.project)
    params = load_params(ctx.project)
    rows = []
    for v in VARIANTS:
        m = metrics(ctx.project, v)
        rows.append(
            {
                "variant": v,
                "epochs": params.variant(v).epochs,
                "train stage s": stages.get(f"train@{v}"),
                "train ms/img": train[v],
                "train speedup": train["rcnn"] / train[v],
                "proposals ms": test[v]["proposals"],
                "network ms": test[v]["network"],
                "postprocess ms": test[v]["post"],
                "test ms/img": test[v]["total"],
                "test speedup": test["rcnn"]["total"] / test[v]["total"],
                "params M": params_m[v],
                "bbox AP": m["bbox_AP"],
                "bbox AP50": m["bbox_AP50"],
                "segm AP": m.get("segm_AP"),
            }
        )
    return {
        "title": "1. Variants side by side (Fast R-CNN paper, Table 4 layout)",
        "paper": (
            "VGG16 on VOC07: R-CNN train 84 h, test 47 s/img; Fast R-CNN 9.5 h (8.8x), "
            "0.32 s/img (146x, proposals excluded); Faster R-CNN 198 ms/img with its RPN "
            "(proposals included)"
        ),
        "columns": list(rows[0]),
        "rows": rows,
        "notes": [
            "speedups are against R-CNN; test times include proposals (selective search "
            "for rcnn and fast_rcnn, the RPN for faster_rcnn and mask_rcnn)",
            "AP: the bench project's models on the generated validation split"
            + (
                " (quick mode: 160 training images, 2 epochs)"
                if ctx.quick
                else " (params.yaml schedules)"
            ),
        ],
    }
