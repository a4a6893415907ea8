"""Mixed precision: what ``amp`` resolves to, the autocast path exercised on a CPU
(bf16), fp32 where it must stay, and the generator states a checkpoint keeps."""

import pytest
import torch
from torchvision.ops import roi_align

from rcnnops.checkpoints import Checkpoints, rng_state, set_rng_state
from rcnnops.data.dataset import DetectionDataset
from rcnnops.data.prepare import load_split
from rcnnops.data.transforms import RandomHorizontalFlip
from rcnnops.engine import fit
from rcnnops.models import build_model
from rcnnops.models.roi import roi_pooler
from rcnnops.precision import PrecisionError, cpu_flags, resolve_amp
from rcnnops.solver import FitConfig
from tests.code.test_models import SMALL

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AMX = {"fpu", "avx2", "avx512f", "amx_tile", "amx_bf16", "avx512_bf16"}
AVX512_BF16 = {"avx2", "avx512f", "avx512_bf16"}
AVX2 = {"fpu", "avx", "avx2"}


@pytest.mark.parametrize(
    ("setting", "device", "flags", "expected"),
    [
        ("auto", CPU, AMX, "bf16"),
        ("auto", CPU, AVX512_BF16, "bf16"),
        ("auto", CPU, AVX2, "fp32"),
        ("auto", CPU, set(), "fp32"),
        ("auto", CUDA, AVX2, "fp16"),
        ("auto", CUDA, AMX, "fp16"),  # CUDA wins over the host CPU's flags
        ("cuda", CPU, AMX, "fp32"),
        ("cuda", CUDA, AVX2, "fp16"),
        (True, CPU, AMX, "fp32"),  # the older boolean: CUDA only
        (True, CUDA, AVX2, "fp16"),
        (False, CUDA, AVX2, "fp32"),
        ("fp32", CPU, AMX, "fp32"),
        ("bf16", CPU, AVX2, "bf16"),  # asked for: emulated, but honoured
        ("fp16", CUDA, AVX2, "fp16"),
    ],
)
def test_amp_resolves_from_cpu_flags_and_cuda(setting, device, flags, expected):
    p = resolve_amp(setting, device, flags)
    assert (p.name, p.device_type) == (expected, device.type)
    assert p.scales_loss == (expected == "fp16")  # GradScaler for fp16 only
    assert p.dtype == {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[expected]


def test_fp16_on_a_cpu_is_a_clear_error():
    with pytest.raises(PrecisionError, match="fp16 needs CUDA.*amp: auto"):
        resolve_amp("fp16", CPU, AMX)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Example CPU\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n\n"
        "processor\t: 1\nflags\t\t: fpu\n"
    )
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert cpu_flags(tmp_path / "missing") == frozenset()


MODEL = SMALL  # the small model the model tests build
MASK_HEAD = {"mask_head_channels": 16, "mask_head_layers": 2, "mask_roi_size": 7}


def _model(variant, labels, dtypes):
    torch.manual_seed(0)
    extra = MASK_HEAD if variant == "mask_rcnn" else {"roi_op": "pool"}
    model = build_model(variant, labels.num_classes + 1, MODEL | extra)
    model.backbone.register_forward_hook(lambda m, i, o: dtypes.add(o["0"].dtype))
    return model


@pytest.mark.parametrize("variant", ["faster_rcnn", "mask_rcnn"])
def test_bf16_training_runs_under_autocast_and_resumes_bit_exactly(
    variant, tiny_prepared, tmp_path
):
    """A few bf16 steps on the CPU: the backbone really computes in bf16, losses
    stay finite, the checkpoint records the precision, and a run interrupted
    mid-epoch 2 resumes to weights identical to an uninterrupted run's."""
    coco, root, labels = load_split(tiny_prepared, "train")
    ds = DetectionDataset(
        coco, root, labels, RandomHorizontalFlip(0.5), masks=variant == "mask_rcnn"
    )
    cfg = FitConfig(
        epochs=2, batch_size=4, lr=0.01, warmup_iters=2, lr_steps=[1], seed=3, log_every=1,
        amp="bf16",
    )  # fmt: skip
    dtypes: set = set()
    ref = _model(variant, labels, dtypes)
    out = fit(ref, ds, cfg, Checkpoints(tmp_path / "ref"), "fp", CPU, progress=False)
    assert dtypes == {torch.bfloat16}
    losses = [s["train/loss_total"] for s in out["steps_log"]]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in ref.parameters())  # fp32 master weights

    def crash(metrics, step):
        if step == 4:  # 3 batches per epoch: mid-epoch 2
            raise KeyboardInterrupt

    ckpts = Checkpoints(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        fit(_model(variant, labels, dtypes), ds, cfg, ckpts, "fp", CPU, log=crash, progress=False)
    state = ckpts.load(ckpts.latest())
    assert state["precision"] == "bf16" and state["epoch"] == 1
    resumed = _model(variant, labels, dtypes)
    again = fit(resumed, ds, cfg, ckpts, "fp", CPU, progress=False)
    assert [s["train/loss_total"] for s in again["steps_log"]] == losses
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_heads_and_anchors_stay_fp32_under_autocast(tiny_prepared):
    """Box decoding, NMS and the losses read the heads' outputs and the anchors:
    under bf16 autocast they are fp32, so detections come out fp32."""
    _, _, labels = load_split(tiny_prepared, "train")
    model = _model("mask_rcnn", labels, set()).eval()
    seen = {}
    model.rpn.anchor_generator.register_forward_hook(lambda m, i, o: seen.update(anchors=o))
    model.rpn.head.register_forward_hook(lambda m, i, o: seen.update(rpn=o))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        (det,) = model([torch.rand(3, 64, 64)])
    assert {a.dtype for a in seen["anchors"]} == {torch.float32}
    assert {t.dtype for out in seen["rpn"] for t in out} == {torch.float32}
    assert det["boxes"].dtype == det["scores"].dtype == det["masks"].dtype == torch.float32


def test_roi_align_under_autocast_samples_at_fp32_coordinates():
    """The models' RoIAlign (torchvision's op, through :func:`roi_pooler`) under
    bf16 autocast computes in fp32 and only rounds its output to bf16: within
    bf16's rounding of the fp32 result. Boxes rounded to bf16 instead (a coordinate
    near 1000 px known to 4 px) are off by more than 0.1: what the fp32 sampling
    avoids. Boxes at fractional coordinates up to 1000 px on a stride-16 map."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 64, 64, generator=g).bfloat16()  # stride 16: a 1024 px image
    xy = torch.rand(20, 2, generator=g) * 900
    wh = 20 + torch.rand(20, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + wh], 1)
    rois = torch.cat([torch.zeros(20, 1), boxes], 1)
    for sr in (1, 2):
        pooler = roi_pooler(["0"], 7, "align", sr)
        reference = roi_align(x.float(), rois, (7, 7), 1 / 16, sr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours = pooler({"0": x}, [boxes], [(1024, 1024)])
        torch.testing.assert_close(ours.float(), reference, rtol=2**-7, atol=1e-2)
        coarse = roi_align(x.float(), rois.bfloat16().float(), (7, 7), 1 / 16, sr)
        assert (coarse - reference).abs().max() > 0.1


def test_checkpoint_rng_includes_cuda_state_on_cuda(monkeypatch):
    """On CUDA the checkpoint keeps the device generator too, and a resume on
    CUDA restores it (simulated: the CUDA generator calls are recorded)."""
    saved_cuda = torch.tensor([7, 7, 7], dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device=None: saved_cuda)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device=None: restored.append(s))
    assert set(rng_state(CPU)) == {"cpu"}
    state = rng_state(CUDA)
    assert torch.equal(state["cuda"], saved_cuda)
    ckpt = {"rng": state["cpu"], "cuda_rng_ranks": [state["cuda"]]}
    set_rng_state(ckpt, 0, CUDA)
    assert len(restored) == 1 and torch.equal(restored[0], saved_cuda)
    set_rng_state(ckpt, 0, CPU)  # a CPU resume of a GPU checkpoint: CPU generator only
    assert len(restored) == 1
