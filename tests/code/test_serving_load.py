"""A bounded load test on loopback: Mask R-CNN served by `rcnnops serve`, 4 clients
x 25 requests mixing valid 128 px images, valid 4096x4096 photos-sized images,
decompression-bomb headers, too many images and oversized bodies. The server's
peak RSS stays under 2 GB; every valid request answers 200, every oversized one
413 with a one-line reason."""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rcnnops.serving import process
from tests.code.test_serving import post

RSS_LIMIT_MB = 2048  # README "Limits and failure behaviour"


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def large_image(side: int = 4096) -> bytes:
    """A ``side`` x ``side`` PNG of smooth content (a few hundred KB, 50 MB decoded)."""
    y, x = np.mgrid[0:side, 0:side]
    pixels = np.stack([(x * 255 // side), (y * 255 // side), ((x + y) % 256)], -1)
    pixels = pixels.astype(np.uint8)
    pixels[side // 4 : side // 2, side // 4 : side // 2] = (230, 200, 40)
    return png(pixels)


def bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def mask_project(tmp_path_factory):
    from tests.code.trained import train_and_register, write_project

    root = write_project(tmp_path_factory.mktemp("load") / "project", ["mask_rcnn"])
    assert train_and_register(root, ["mask_rcnn"]) == {"mask_rcnn": "1"}
    return root


@pytest.mark.reliability
def test_bounded_under_mixed_load(mask_project, tmp_path):
    small = sorted((mask_project / "data/raw/shapes/val").glob("*.png"))[0].read_bytes()
    large = large_image()
    cases = {  # name -> (payload, expected status, message part)
        "small": ({"dataframe_records": [{"image": b64(small)}]}, 200, None),
        "large": ({"dataframe_records": [{"image": b64(large)}]}, 200, None),
        "two": ({"dataframe_records": [{"image": b64(small)}, {"image": b64(large)}]}, 200, None),
        "bomb": ({"dataframe_records": [{"image": b64(bomb_header())}]}, 413,
                 "pixels; the limit is 50,000,000"),
        "wide bomb": ({"dataframe_records": [{"image": b64(bomb_header(9000, 9000))}]}, 413,
                      "81,000,000 pixels; the limit is 50,000,000"),
        "many": ({"dataframe_records": [{"image": b64(small)}] * 17}, 413,
                 "holds 17 images; the limit is 16"),
        "body": ({"dataframe_records": [{"image": "A" * (33 * 2**20)}]}, 413,
                 "larger than 32 MB"),
    }  # fmt: skip
    bodies = {k: json.dumps(v[0]).encode() for k, v in cases.items()}
    order = list(cases)
    port = process.free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed below)
    server = process.start_server(mask_project, "mask_rcnn", port, "--max-queue", "4",
                                  stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    results: list[tuple[str, int, dict, float]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(25):
            name = order[(i + j) % len(order)]
            t0 = time.monotonic()
            status, _, body = post(url, bodies[name], timeout=120)
            with lock:
                results.append((name, status, body, time.monotonic() - t0))

    try:
        process.wait_until_up(url, server, timeout=120)
        idle_mb = peak_rss_mb(server.pid)
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=900)
        wall = time.monotonic() - started
        peak_mb = peak_rss_mb(server.pid)
    finally:
        process.stop_server(server)
        log.close()
    assert len(results) == 100
    for name, status, body, _ in results:
        payload, expected, message = cases[name]
        assert status == expected, (name, status, body)
        if expected == 200:
            assert len(body["predictions"]) == len(payload["dataframe_records"])
        else:
            assert message in body["message"] and "\n" not in body["message"], body
    if "large" in {n for n, *_ in results}:  # detections are in the 4096 px frame
        big = next(b for n, s, b, _ in results if n == "large")["predictions"][0]
        assert all(0 <= v <= 4096 for box in big["boxes"] for v in box)
    worst = {n: max(t for m, *_, t in results if m == n) for n in cases}
    print(f"\nserver RSS: idle {idle_mb:.0f} MB, peak {peak_mb:.0f} MB (limit {RSS_LIMIT_MB});"
          f" 100 requests in {wall:.1f} s; slowest per kind (s): "
          + ", ".join(f"{n} {t:.2f}" for n, t in worst.items()))  # fmt: skip
    assert peak_mb < RSS_LIMIT_MB
