"""The papers' pieces: R-CNN warp, box coding, sampling, truncated SVD."""

import copy

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from rcnnops.models import build_model
from rcnnops.models.rcnn import WarpCrops, expand_boxes
from rcnnops.models.roi import ProposalRoIHeads, compress, roi_pooler, truncate_fc


def test_warp_of_a_known_region_equals_its_pixels():
    image = torch.arange(3 * 20 * 30, dtype=torch.float32).reshape(1, 3, 20, 30)
    warp = WarpCrops(warp_size=8, context=0)
    box = torch.tensor([[4.0, 6.0, 12.0, 14.0]])  # 8x8 region: no resampling needed
    # sampling_ratio 2 averages 4 sub-samples symmetric about each pixel centre:
    # on a linear ramp that is exactly the pixel value.
    (crop,) = warp({"image": image}, [box], [(20, 30)])
    assert torch.allclose(crop, image[0, :, 6:14, 4:12], atol=1e-4)


def test_context_padding_matches_the_paper():
    # 16 px of context at 227: the box grows by 227 / 195 about its centre.
    grown = expand_boxes(torch.tensor([[0.0, 0.0, 195.0, 97.5]]), 227, 16)
    assert torch.allclose(grown, torch.tensor([[-16.0, -8.0, 211.0, 105.5]]))


def test_box_coding_round_trip():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    props = torch.tensor([[10.0, 10.0, 50.0, 30.0], [0.0, 0.0, 8.0, 16.0]])
    gt = torch.tensor([[12.0, 8.0, 60.0, 33.0], [1.0, 2.0, 7.0, 20.0]])
    deltas = coder.encode_single(gt, props)
    # t_w = log(w_gt / w_p) (log-space size), scaled by the weight 5.
    assert deltas[0, 2] == pytest.approx(5.0 * torch.log(torch.tensor(48.0 / 40.0)).item())
    assert torch.allclose(coder.decode_single(deltas, props), gt, atol=1e-4)


def test_sampling_follows_the_paper():
    """fg IoU >= 0.5; bg IoU in [0.1, 0.5); IoU < 0.1 ignored; <= 25 % fg."""
    torch.manual_seed(0)
    heads = ProposalRoIHeads(
        roi_pooler(["0"], 7, "pool"),
        TwoMLPHead(8 * 49, 16),
        FastRCNNPredictor(16, 3),
        0.5,
        0.5,
        16,
        0.25,
        None,
        0.05,
        0.5,
        100,
        bg_iou_low=0.1,
    )
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    fg = torch.tensor([[0.0, 0.0, 10.0, 10.0 - s] for s in (0, 1, 2, 3, 4)])  # IoU >= .6
    bg = torch.tensor([[5.0, 0.0, 15.0, 10.0]] * 20)  # IoU 1/3
    far = torch.tensor([[50.0, 50.0, 60.0, 60.0]] * 30)  # IoU 0: ignored
    props = [torch.cat([fg, bg, far])]
    _, _, labels, _ = heads.select_training_samples(
        props, [{"boxes": gt, "labels": torch.tensor([2])}]
    )
    (lab,) = labels
    assert len(lab) == 16
    assert (lab == 2).sum() == 4  # 25 % of 16 (6 candidates incl. the added GT)
    assert (lab == 0).sum() == 12


def test_truncated_svd_keeps_outputs_at_full_rank_and_shrinks_at_low_rank():
    torch.manual_seed(0)
    fc = torch.nn.Linear(64, 32)
    x = torch.randn(5, 64)
    full = truncate_fc(fc, 32)
    assert torch.allclose(full(x), fc(x), atol=1e-4)
    small = truncate_fc(fc, 4)
    assert sum(p.numel() for p in small.parameters()) == 4 * 64 + 4 * 32 + 32
    model = build_model(
        "fast_rcnn",
        3,
        {"min_size": 64, "max_size": 64, "representation_size": 32, "box_head": "mlp"},
    )
    before = sum(p.numel() for p in model.parameters())
    compress(model, 8)
    assert sum(p.numel() for p in model.parameters()) < before


@pytest.mark.parametrize(("inputs", "outputs"), [(96, 40), (24, 56)], ids=["wide", "tall"])
def test_truncation_is_the_best_rank_t_approximation_an_svd_gives(inputs, outputs):
    """Whichever side is smaller, the two layers' product is U_t S_t V_t^T (Eckart-Young)."""
    torch.manual_seed(0)
    fc = torch.nn.Linear(inputs, outputs)
    u, s, vh = torch.linalg.svd(fc.weight.detach().double(), full_matrices=False)
    for rank in (3, 10):
        first, second = truncate_fc(fc, rank)
        product = (second.weight @ first.weight).detach().double()
        expected = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]
        torch.testing.assert_close(product, expected, atol=1e-5, rtol=0)
        assert torch.equal(second.bias, fc.bias)


TINY_HEAD = {"min_size": 64, "max_size": 64, "representation_size": 32}


@pytest.mark.parametrize(
    ("variant", "head"),
    [
        ("fast_rcnn", "mlp"),
        ("fast_rcnn", "mlp_bn"),
        ("faster_rcnn", "mlp"),
        ("faster_rcnn", "mlp_bn"),
        ("mask_rcnn", "mlp_bn"),
    ],
)
def test_compress_truncates_every_fc_of_the_box_head(variant, head):
    """Each FC becomes two layers whose product has rank <= t; at full rank the
    RoI head's outputs (class scores, box deltas) are those of the original."""
    torch.manual_seed(0)
    params = TINY_HEAD | {"box_head": head}
    if variant != "fast_rcnn":
        params["anchor_sizes"] = [16, 32]
    model = build_model(variant, 3, params).eval()
    roi_heads = model.roi_heads
    names = [n for n, m in roi_heads.box_head.named_children() if isinstance(m, torch.nn.Linear)]
    assert len(names) == 2  # mlp: fc6, fc7; mlp_bn: the two Linear layers
    x = torch.randn(
        6, model.backbone.out_channels, 7, 7, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        before = roi_heads.box_predictor(roi_heads.box_head(x))
    full = copy.deepcopy(model)
    assert compress(full, 32) is full
    low = compress(model, 4)
    for name in names:
        for compressed, rank in ((full, 32), (low, 4)):
            first, second = getattr(compressed.roi_heads.box_head, name)
            assert isinstance(first, torch.nn.Linear) and isinstance(second, torch.nn.Linear)
            assert first.out_features == second.in_features == rank
            product = (second.weight @ first.weight).detach()
            assert torch.linalg.matrix_rank(product) <= rank
    with torch.no_grad():
        after = full.roi_heads.box_predictor(full.roi_heads.box_head(x))
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_compress_takes_one_rank_per_fc_layer_as_the_paper_does():
    """The Fast R-CNN paper truncates fc6 and fc7 to different ranks (1024, 256)."""
    torch.manual_seed(0)
    model = build_model("fast_rcnn", 3, TINY_HEAD | {"box_head": "mlp"}).eval()
    compress(model, [8, 4])
    head = model.roi_heads.box_head
    assert [head.fc6[0].out_features, head.fc7[0].out_features] == [8, 4]
    other = build_model("fast_rcnn", 3, TINY_HEAD | {"box_head": "mlp"})
    with pytest.raises(ValueError, match=r"3 SVD ranks for the 2 FC layers .*\(fc6, fc7\)"):
        compress(other, [8, 4, 2])


def test_compress_refuses_a_box_head_without_fc_layers():
    model = build_model("rcnn", 3, {"warp_size": 16, "context": 1, "width": 8} | TINY_HEAD)
    with pytest.raises(ValueError, match=r"RCNN's box head \(CropNet\) has no FC layer"):
        compress(model, 8)
