"""The server that follows an alias: the follower's swap rules and the app's
bounds with stand-in models (fast), then the real thing: `rcnnops serve` on
loopback while the registry's champion is promoted, rolled back and broken."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rcnnops.detect import DeadlineExceeded, TooLarge
from rcnnops.serving import process
from rcnnops.serving.app import RequestLimits, create_app, parse_payload
from rcnnops.serving.follower import Follower, Loaded

# --- the follower, with a stand-in registry ------------------------------------------


class Registry:
    """``alias`` names a version; ``broken`` versions fail to load."""

    def __init__(self, version: str = "1") -> None:
        self.version, self.broken, self.down, self.loads = version, set(), False, []

    def resolve(self, name: str, alias: str) -> str:
        if self.down:
            raise ConnectionError("http://user:secret@mlflow.example:5000 refused the connection")
        return self.version

    def load(self, name: str, version: str) -> Loaded:
        self.loads.append(version)
        if version in self.broken:
            raise RuntimeError(f"model.pt of v{version}: cannot load model weights")
        return Loaded(name, version, model=None, loaded_at="now")


def test_follower_swaps_on_a_move_and_keeps_serving_through_failures():
    reg = Registry("1")
    f = Follower("rcnnops-x", "champion", poll_s=5, resolve=reg.resolve, load=reg.load)
    assert f.start().version == "1" and f._thread is not None
    f.stop()
    assert f.poll_once() is False and reg.loads == ["1"]  # no move: nothing loaded

    reg.version = "2"
    assert f.poll_once() is True and f.current.version == "2"
    assert f.health()["status"] == "ok" and f.health()["swaps"] == 1

    reg.version, reg.broken = "3", {"3"}
    assert f.poll_once() is False and f.current.version == "2"  # the old one keeps serving
    health = f.health()
    assert health["status"] == "degraded" and health["version"] == "2"
    assert health["failed_load"]["version"] == "3"
    assert "cannot load model weights" in health["failed_load"]["error"]
    assert f.poll_once() is False and reg.loads.count("3") == 1  # backing off, not hammering
    f.failure.retry_at = 0  # the back-off has passed
    assert f.poll_once() is False and f.health()["failed_load"]["attempts"] == 2

    reg.down = True  # the registry is unreachable: keep serving, say so, no secret
    assert f.poll_once() is False and f.current.version == "2"
    assert "refused" in f.health()["registry_error"] and "secret" not in json.dumps(f.health())
    reg.down = False

    reg.version = "2"  # rolled back past the broken version
    assert f.poll_once() is False and f.health()["status"] == "ok"
    assert "failed_load" not in f.health()


def test_a_pinned_version_is_never_polled():
    reg = Registry("5")
    f = Follower("rcnnops-x", None, version="3", resolve=reg.resolve, load=reg.load)
    assert f.start().version == "3" and f._thread is None
    assert f.health()["follows"] is None and reg.loads == ["3"]


def test_a_version_that_cannot_load_at_start_is_an_error():
    reg = Registry("1")
    reg.broken = {"1"}
    with pytest.raises(RuntimeError, match="cannot load"):
        Follower("rcnnops-x", resolve=reg.resolve, load=reg.load).start()


# --- the app, with stand-in models ----------------------------------------------------


def test_scoring_payloads_are_read_as_mlflow_sends_them():
    cols = {"image": ["a", "b"]}
    assert parse_payload({"dataframe_records": [{"image": "a"}, {"image": "b"}]})[0] == cols
    split = {"dataframe_split": {"columns": ["image"], "data": [["a"], ["b"]]}}
    assert parse_payload(split)[0] == cols
    assert parse_payload({"instances": ["a"], "params": {"score_threshold": 0.2}}) == (
        ["a"], {"score_threshold": 0.2},
    )  # fmt: skip
    assert parse_payload({"inputs": {"image": ["a"]}})[0] == {"image": ["a"]}
    for bad, message in (
        ([1, 2], "JSON object"),
        ({"dataframe_records": [], "inputs": []}, "exactly one of"),
        ({"records": []}, "exactly one of"),
        ({"dataframe_split": {"columns": ["image"], "data": [["a", "b"]]}}, "1 value"),
        ({"inputs": ["a"], "params": [1]}, "'params' must be"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_payload(bad)


class Model:
    """Stands in for a loaded version: ``detect`` takes ``seconds`` per image."""

    def __init__(self, version: str, seconds: float = 0.0, fail: Exception | None = None):
        self.version, self.seconds, self.fail = version, seconds, fail
        self.started = threading.Event()

    def unwrap_python_model(self) -> Model:  # as mlflow's PyFuncModel
        return self

    def detect(self, model_input, threshold, deadline=None):
        self.started.set()
        n = len(model_input["image"])
        for i in range(n):
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(f"the request's time limit passed after {i} of {n}")
            if self.fail is not None:
                raise self.fail
            time.sleep(self.seconds)
        return [{"boxes": [], "v": self.version}] * n


class FixedFollower(Follower):
    def __init__(self, model: Model) -> None:
        super().__init__("rcnnops-x", "champion")
        self._current = Loaded("rcnnops-x", model.version, model, "now")

    @property
    def current(self) -> Loaded:
        return self._current


@contextmanager
def app_server(follower: Follower, limits: RequestLimits):
    """The app on uvicorn in a thread, on a free loopback port."""
    import uvicorn

    port = process.free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(follower, limits), host="127.0.0.1", port=port, log_level="error"
        )  # fmt: skip
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def post(url: str, body: bytes | dict, headers: dict | None = None, timeout: float = 60):
    """``(status, headers, parsed JSON body)``."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{url}/invocations", data, {"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read())


def records(n: int) -> dict:
    return {"dataframe_records": [{"image": "x"}] * n}


def test_answers_name_the_version_and_errors_are_one_line():
    model = Model("7", fail=None)
    with app_server(FixedFollower(model), RequestLimits(max_request_mb=0.001)) as url:
        status, headers, body = post(url, records(2))
        assert status == 200 and headers["X-Model-Version"] == "7"
        assert body["model_version"] == "7" and len(body["predictions"]) == 2
        big = {"dataframe_records": [{"image": "x" * 2000}]}
        assert post(url, big)[0] == 413
        assert "larger than 0.001 MB" in post(url, big)[2]["message"]
        for raw in (b"{not json", b"\xff\xfe{}"):
            status, _, body = post(url, raw)
            assert status == 400 and body["message"].startswith("the body is not JSON"), body
        status, _, body = post(url, b"{}", {"Content-Type": "text/csv"})
        assert status == 415
        model.fail = TooLarge("input row 0: image is 9x9 pixels; the limit is 4")
        assert post(url, records(1))[0] == 413
        model.fail = RuntimeError("boom\nwith a second line")
        status, headers, body = post(url, records(1))
        assert status == 500 and headers["X-Model-Version"] == "7"
        assert body["message"] == "the model failed: RuntimeError: boom with a second line"
        assert "Traceback" not in json.dumps(body)


def test_json_nested_too_deep_is_a_bad_request_and_media_types_ignore_case():
    """A body nested beyond the JSON parser's recursion limit was answered 500 "the
    model failed"; ``Application/JSON`` (media types ignore case) was refused 415."""
    with app_server(FixedFollower(Model("7", fail=None)), RequestLimits()) as url:
        status, _, body = post(url, b"[" * 100_000 + b"]" * 100_000)
        assert (status, body["message"]) == (400, "the body's JSON is nested too deeply")
        status, headers, _ = post(url, records(1), {"Content-Type": "Application/JSON"})
        assert status == 200 and headers["X-Model-Version"] == "7"


def test_a_full_queue_is_refused_at_once_and_time_limits_hold():
    """1 worker + 1 queued place: a third concurrent request gets 503 without
    waiting; a request past timeout_s stops between images with 504."""
    model = Model("1", seconds=0.4)
    limits = RequestLimits(workers=1, max_queue=1, timeout_s=1.5)
    with app_server(FixedFollower(model), limits) as url:
        results: list = []
        threads = [
            threading.Thread(target=lambda: results.append(post(url, records(2)))) for _ in range(2)
        ]
        threads[0].start()
        assert model.started.wait(10)
        threads[1].start()
        time.sleep(0.2)  # the second is queued
        t0 = time.monotonic()
        status, _, body = post(url, records(1))
        assert status == 503 and "server busy" in body["message"]
        assert time.monotonic() - t0 < 0.3  # refused at once, not after a wait
        for t in threads:
            t.join()
        assert sorted(r[0] for r in results) == [200, 200]
        status, _, body = post(url, records(10))  # 10 x 0.4 s > 1.5 s
        assert status == 504 and "after 4 of 10" in body["message"]


# --- the real server following the real registry ------------------------------------


def _png(size: int = 128, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def add_version(project: Path, nudge: float) -> str:
    """A new registered version of faster_rcnn: the trained weights with the box
    predictor's biases nudged, evaluated (so its metrics name it) and registered."""
    from rcnnops import evaluate, registry
    from rcnnops.config import load_params

    pt = project / "models/faster_rcnn/model.pt"
    state = torch.load(pt, weights_only=True)
    state["roi_heads.box_predictor.cls_score.bias"][1:] += nudge  # foreground vs background
    torch.save(state, pt)
    p = load_params(project / "params.yaml")
    evaluate.run(p, "faster_rcnn", progress=False)
    return registry.register_variant(p, "faster_rcnn").version


def break_artifact(project: Path, version: str) -> Path:
    """Truncate version's registered model.pt in the artifact store (a corrupted store)."""
    from rcnnops import tracking

    source = tracking.client().get_model_version("rcnnops-faster_rcnn", version).source
    model_id = source.removeprefix("models:/")  # MLflow 3: the version's logged model
    (target,) = (project / "mlartifacts/models" / model_id).rglob("model_dir/model.pt")
    target.write_bytes(target.read_bytes()[:4000])
    return target


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """faster_rcnn trained, registered (v1) and champion."""
    from tests.code.trained import train_and_register, write_project

    root = write_project(tmp_path_factory.mktemp("follow") / "project", ["faster_rcnn"])
    assert train_and_register(root, ["faster_rcnn"]) == {"faster_rcnn": "1"}
    return root


class Clients:
    """``n`` threads, each sending ``each`` requests ``pause`` s apart, recording
    ``(start, end, status, version)``."""

    def __init__(self, url: str, body: dict, n: int = 4, each: int = 200, pause: float = 0.25):
        self.url, self.body, self.each, self.pause = url, body, each, pause
        self.log: list[tuple[float, float, int, str | None]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def _run(self) -> None:
        for _ in range(self.each):
            t0 = time.monotonic()
            try:
                status, headers, body = post(self.url, self.body, timeout=60)
                version = body.get("model_version")
                assert headers["X-Model-Version"] == version
            except Exception as e:  # a refused connection, a reset: a failed request
                status, version = -1, repr(e)
            with self.lock:
                self.log.append((t0, time.monotonic(), status, version))
            time.sleep(self.pause)

    def served_since(self, t: float) -> set:
        with self.lock:
            return {v for start, _, _, v in self.log if start >= t}


def _wait_for(predicate, timeout: float, what: str, log: Path | None = None) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            tail = log.read_text()[-3000:] if log is not None and log.is_file() else ""
            raise AssertionError(f"{what} within {timeout:g} s\n{tail}")
        time.sleep(0.05)
    return time.monotonic()


def _health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=10) as r:
        return json.loads(r.read())


@pytest.mark.scale
def test_the_server_follows_promotion_and_rollback_without_a_failed_request(project, tmp_path):
    """4 clients x 200 requests while v2 is promoted then rolled back: every request
    answers 200 from v1 or v2, and the answers switch within 2 polling intervals.
    Then a v3 whose stored model file is broken is promoted: v1 keeps answering and
    /health reports the failed load."""
    from rcnnops import registry
    from rcnnops.config import load_params
    from tests.code.trained import inside

    # 5 s: under CI's load (2 cores, 4 clients keeping the one worker busy) loading
    # and checking the new version took longer than the 2 intervals of a 2 s poll.
    poll = 5.0
    with inside(project):
        v2 = add_version(project, nudge=0.5)
    assert v2 == "2"
    port = process.free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed below)
    # the project's store, whatever another test left in this process's environment
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project / 'mlflow.db'}"}
    server = process.start_server(project, "faster_rcnn", port, "--poll-s", str(poll), env=env,
                                  stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        process.wait_until_up(url, server, timeout=120)
        image = sorted((project / "data/raw/shapes/val").glob("*.png"))[0]
        body = {"dataframe_records": [{"image": base64.b64encode(image.read_bytes()).decode()}]}
        clients = Clients(url, body)
        for t in clients.threads:
            t.start()
        p = load_params(project / "params.yaml")
        time.sleep(2)
        with inside(project):
            registry.promote_variant(p, "faster_rcnn", v2, force=True, actor="test")
        promoted = time.monotonic()
        switched = _wait_for(
            lambda: clients.served_since(promoted) >= {"2"}, 4 * poll,
            "no answer from v2 after the promotion", tmp_path / "server.log",
        )  # fmt: skip
        assert clients.served_since(promoted + 2 * poll) <= {"2"}
        time.sleep(max(0.0, promoted + 3 * poll - time.monotonic()))
        with inside(project):
            assert registry.rollback_variant(p, "faster_rcnn").to_version == "1"
        rolled_back = time.monotonic()
        _wait_for(lambda: "1" in clients.served_since(rolled_back), 4 * poll,
                  "no answer from v1 after the rollback")  # fmt: skip
        time.sleep(2 * poll + 1)
        assert clients.served_since(rolled_back + 2 * poll) == {"1"}
        for t in clients.threads:
            t.join(timeout=300)
        statuses = [status for _, _, status, _ in clients.log]
        assert len(statuses) == 800 and set(statuses) == {200}, set(statuses)
        assert {v for *_, v in clients.log} == {"1", "2"}
        print(f"switched to v2 {switched - promoted:.2f} s after the promotion")

        with inside(project):
            v3 = add_version(project, nudge=-0.5)
            break_artifact(project, v3)
            registry.promote_variant(p, "faster_rcnn", v3, force=True, actor="test")
        broken = time.monotonic()
        _wait_for(lambda: "failed_load" in _health(url), 4 * poll, "no failed load in /health")
        health = _health(url)
        assert health["version"] == "1" and health["status"] == "degraded"
        assert health["failed_load"]["version"] == v3
        assert "model.pt" in health["failed_load"]["error"]
        status, headers, answer = post(url, body)
        assert status == 200 and answer["model_version"] == "1" and time.monotonic() > broken
    finally:
        process.stop_server(server)
        log.close()
    text = (tmp_path / "server.log").read_text()
    assert f"v{v3} failed to load or to answer; still serving v1" in text


# --- images fitted to the model before anything is computed -------------------------


def test_images_are_fitted_to_the_model_size_and_answers_come_back_in_the_sent_frame():
    from rcnnops import detect

    assert detect.fitted_size(4096, 4096, (800, 1333)) == (800, 800)
    assert detect.fitted_size(1000, 3000, (800, 1333)) == (444, 1333)  # max_size binds
    assert detect.fitted_size(300, 200, (800, 1333)) == (300, 200)  # never enlarged
    picture = detect.decode_base64_image(
        base64.b64encode(_png(1024)).decode(), "row 0", detect.ImageLimits(), (128, 256)
    )
    assert picture.pixels.shape == (128, 128, 3) and picture.size == (1024, 1024)
    masks = torch.zeros(1, 1, 128, 128)
    masks[0, 0, 32:64, 0:128] = 1.0
    output = {"boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]), "labels": torch.tensor([1]),
              "scores": torch.tensor([0.9]), "masks": masks}  # fmt: skip
    det = detect.to_detections(output, ("a",), 0.5, picture)
    assert det["boxes"] == [[80.0, 160.0, 240.0, 320.0]]
    from rcnnops.data.masks import decode

    full = decode(det["masks"][0], 1024, 1024)
    assert full.shape == (1024, 1024) and full[256:512].all() and full.sum() == 256 * 1024


class Heads:
    score_thresh = 0.05


class Transform:
    fixed_size = None


class Recording(torch.nn.Module):
    """Stands in for a detector: records the heads' threshold, the image size and
    the size its transform is told to keep."""

    def __init__(self):
        super().__init__()
        self.roi_heads, self.transform, self.seen = Heads(), Transform(), []

    def forward(self, images, proposals=None):
        self.seen.append((self.roi_heads.score_thresh, tuple(images[0].shape),
                          None if proposals is None else tuple(proposals[0].shape),
                          self.transform.fixed_size))  # fmt: skip
        return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                 "scores": torch.zeros(0)}]  # fmt: skip


def test_the_threshold_is_applied_before_masks_and_search_sees_the_fitted_image(monkeypatch):
    """The request's threshold is the heads' threshold during the forward (so Mask
    R-CNN pastes nothing below it) and restored after; selective search runs on the
    image fitted to the model, never the full-size one."""
    from rcnnops import detect
    from rcnnops.proposals import selective_search as ss

    searched = []

    def search(pixels, **settings):
        searched.append(pixels.shape)
        return np.array([[0, 0, 8, 8]], np.float32), np.ones(1, np.float32)

    monkeypatch.setattr(ss, "selective_search", search)
    model = Recording()
    detector = detect.Detector(model, "fast_rcnn", ("a",), proposals={"mode": "fast"})
    monkeypatch.setattr(detect.Detector, "fit", property(lambda self: (64, 100)))
    image = np.zeros((400, 200, 3), np.uint8)
    assert detector([image], score_threshold=0.7) == [
        {"boxes": [], "labels": [], "names": [], "scores": []}
    ]
    assert model.seen == [(0.7, (3, 100, 50), (1, 4), (50, 100))] and searched == [(100, 50, 3)]
    assert model.roi_heads.score_thresh == 0.05 and model.transform.fixed_size is None
    detector([image[:80, :40]])  # not reduced: the transform keeps its own rule
    assert model.seen[-1][1:] == ((3, 80, 40), (1, 4), None)
    with pytest.raises(DeadlineExceeded, match="after 0 of 1"):
        detector([image], deadline=time.monotonic() - 1)


def _photo(w: int, h: int) -> Image.Image:
    """A JPEG-like photo: smooth shading, hard edges and fine texture (what a
    downscale treats differently with and without antialiasing)."""
    g = torch.Generator().manual_seed(1)
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rgb = torch.stack([x * 255 // w, y * 255 // h, (x // 3 + y // 5) % 2 * 200], -1)
    rgb = rgb + torch.randint(0, 40, (h, w, 3), generator=g)
    rgb[h // 4 : h // 2, w // 3 : w // 2] = torch.tensor([250, 30, 30])
    return Image.fromarray(rgb.clamp(0, 255).to(torch.uint8).numpy())


def test_a_photo_larger_than_the_model_is_served_as_evaluation_sees_it(tmp_path):
    """A photo above the model's size was reduced by the served path its own way
    (JPEG reduced-scale decoding, Pillow's antialiased bilinear, sides rounded),
    then the model's transform resampled it once more: a train/serve skew (up to 8
    px and 0.011 in score against the export on a COCO photo). The network now
    gets the tensor evaluation gives it, and the detections are evaluation's, in
    the frame of the photo as sent."""
    from rcnnops.data.io import load_image
    from rcnnops.detect import Detector, ImageLimits, decode_base64_image
    from rcnnops.models import build_model
    from rcnnops.serving.parity import compare

    torch.manual_seed(0)
    params = {"backbone": "small", "min_size": 96, "max_size": 160, "anchor_sizes": [16, 32],
              "representation_size": 32}  # fmt: skip
    model = build_model("faster_rcnn", 3, params).eval()
    model.roi_heads.score_thresh = 0.0
    seen = []
    model.backbone.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    path = tmp_path / "photo.jpg"
    _photo(1003, 701).save(path, quality=90)  # 96/701 binds: 137x96; floor, not round
    with torch.no_grad():
        evaluated = model([load_image(path)])[0]
    detector = Detector(model, "faster_rcnn", ("a", "b"))
    b64 = base64.b64encode(path.read_bytes()).decode()
    picture = decode_base64_image(b64, "row 0", ImageLimits(), detector.fit)
    assert picture.size == (701, 1003) and picture.pixels.shape == (96, 137, 3)
    served = detector([picture], score_threshold=0.0)[0]
    assert seen[0].shape == seen[1].shape and torch.allclose(seen[0], seen[1], atol=1e-5)
    assert model.transform.fixed_size is None  # told the size for that image only
    answer = {"boxes": torch.tensor(served["boxes"]).reshape(-1, 4),
              "labels": torch.tensor(served["labels"], dtype=torch.int64),
              "scores": torch.tensor(served["scores"])}  # fmt: skip
    row = compare("photo.jpg", evaluated, answer)
    assert len(served["scores"]) == len(evaluated["scores"]) > 10
    assert row.same_count_labels and row.box_diff < 0.02 and row.score_diff < 2e-4, row


def _encoded(im: Image.Image, **save) -> str:
    buf = io.BytesIO()
    im.save(buf, "PNG", **save)
    return base64.b64encode(buf.getvalue()).decode()


def test_sent_images_are_read_as_shown_and_as_training_reads_them(tmp_path):
    """A phone photo stored sideways with an EXIF orientation came back with boxes
    in the stored frame (and the model saw it sideways); a 16-bit PNG was decoded
    nearly white (Pillow's conversion clips it). Both as the training loader reads
    them (rcnnops.data.io), at full size and fitted to the model."""
    from rcnnops.data.io import load_image_array
    from rcnnops.request_images import ImageLimits, decode_base64_image

    rng = np.random.default_rng(0)
    shown = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))  # 60 wide
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned a quarter; shown after a 270-degree rotation
    stored = shown.transpose(Image.Transpose.ROTATE_90)  # 40 wide, 60 high
    b64 = _encoded(stored, exif=exif)
    picture = decode_base64_image(b64, "row 0", ImageLimits())
    assert picture.size == (40, 60)
    assert np.array_equal(picture.pixels, np.asarray(shown))
    path = tmp_path / "exif6.png"  # the training loader on the same file
    path.write_bytes(base64.b64decode(b64))
    assert np.array_equal(load_image_array(path), picture.pixels)
    fitted = decode_base64_image(b64, "row 0", ImageLimits(), fit=(20, 30))
    assert (fitted.size, fitted.pixels.shape) == ((40, 60), (20, 30, 3))
    grey = rng.integers(0, 255, (30, 50), dtype=np.uint8)
    deep = Image.fromarray(grey.astype(np.uint16) * 257)  # 16-bit, same picture
    for fit in (None, (15, 25)):
        as16 = decode_base64_image(_encoded(deep), "row 0", ImageLimits(), fit=fit).pixels
        as8 = decode_base64_image(_encoded(Image.fromarray(grey)), "row 0", ImageLimits(), fit=fit)
        assert np.abs(as16.astype(int) - as8.pixels.astype(int)).max() <= 1
    from tests.code.test_serving_load import b64, bomb_header

    with pytest.raises(TooLarge, match="81,000,000 pixels"):  # from the header, not read
        decode_base64_image(b64(bomb_header(9000, 9000)), "row 0", ImageLimits())
    palette = shown.quantize(64)  # fitted bilinear, as its RGB copy (not nearest)
    fitted = [
        decode_base64_image(_encoded(im), "row 0", ImageLimits(), fit=(20, 30)).pixels
        for im in (palette, palette.convert("RGB"))
    ]
    assert np.array_equal(*fitted)
