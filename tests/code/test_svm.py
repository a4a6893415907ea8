"""R-CNN's SVM + ridge second stage (``classifier: svm``) on tiny cases."""

import torch

from rcnnops.data.dataset import DetectionDataset
from rcnnops.data.prepare import load_split
from rcnnops.models import build_model
from rcnnops.models.svm import mine_svm, ridge
from rcnnops.proposals.precompute import ProposalStore, SearchSettings, precompute


def test_hard_negative_mining_separates_classes():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(20, 5, generator=g) + 3.0
    neg = torch.randn(500, 5, generator=g) - 3.0
    neg[:5] += 4.0  # a few hard negatives near the positives
    w, b, used = mine_svm(pos, neg, start=50)
    assert (pos @ w + b > 0).all() and (neg @ w + b < 0).float().mean() > 0.98
    assert 50 <= used < 500  # mining added only the hard ones


def test_ridge_recovers_a_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    true = torch.randn(6, 4, generator=g)
    w = ridge(x, x @ true + 0.5, lam=1e-6)
    assert torch.allclose(w[:-1], true, atol=1e-3) and torch.allclose(
        w[-1], torch.full((4,), 0.5), atol=1e-3
    )


TINY_SVM_RCNN = {
    "warp_size": 16,
    "context": 1,
    "width": 8,
    "min_size": 64,
    "max_size": 64,
    "representation_size": 32,
    "classifier": "svm",
}


def test_rcnn_with_svms_on_a_tiny_dataset(tiny_prepared, tmp_path):
    s = SearchSettings(mode="fast", max_boxes=100, min_size=4)
    precompute(tiny_prepared, tmp_path / "props", s, workers=1)
    coco, root, labels = load_split(tiny_prepared, "train")
    store = ProposalStore(tmp_path / "props" / "train", s)
    ds = DetectionDataset(coco, root, labels, proposals=store.boxes_for)
    torch.manual_seed(0)
    model = build_model("rcnn", labels.num_classes + 1, TINY_SVM_RCNN)
    counts = model.fit_svms(ds[i] for i in range(len(ds)))
    assert counts and all(c["positives"] > 0 and c["negatives_used"] > 0 for c in counts.values())
    assert bool(model.roi_heads.svm.trained)
    image, target = ds[0]
    with torch.no_grad():
        (out,) = model.eval()([image], proposals=[target["proposals"]])
    assert out["boxes"].shape[1] == 4 and ((out["scores"] > 0) & (out["scores"] < 1)).all()
    # The SVMs are buffers: saved and restored with the weights.
    again = build_model("rcnn", labels.num_classes + 1, TINY_SVM_RCNN)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.roi_heads.svm.weight, model.roi_heads.svm.weight)


def _never(reason: str):
    raise AssertionError(reason)
    yield


def test_second_stage_is_the_variants_own(capsys):
    """softmax: nothing to train (samples untouched); svm: the SVMs, on the CPU,
    with the model left where it was."""
    softmax = build_model("rcnn", 3, TINY_SVM_RCNN | {"classifier": "softmax"})
    assert softmax.second_stage(_never("softmax must not read samples")) is None

    g = torch.Generator().manual_seed(0)
    boxes = torch.tensor([[4.0, 4.0, 28.0, 30.0], [34.0, 30.0, 60.0, 62.0]])
    samples = [
        (
            torch.rand(3, 64, 64, generator=g),
            {
                "boxes": boxes,
                "labels": torch.tensor([1, 2]),
                "proposals": torch.rand(40, 2, generator=g).mul(40).repeat(1, 2)
                + torch.tensor([0.0, 0.0, 12.0, 12.0]),
            },
        )
        for _ in range(3)
    ]
    torch.manual_seed(0)
    model = build_model("rcnn", 3, TINY_SVM_RCNN)
    assert model.second_stage(iter(samples)) == "svm"
    assert bool(model.roi_heads.svm.trained)
    assert next(model.parameters()).device.type == "cpu"
    assert "trained 2 per-class SVMs (+ ridge box regressors)" in capsys.readouterr().out
