"""Looking at a web UI as a user would: Debian's headless Chromium (`apt install
chromium`), driven from the command line: `--dump-dom` prints the page after its
JavaScript ran (both UIs are single-page apps), `--screenshot` saves a picture.
No Playwright: nothing to download at test time, and the system browser is the
one a user of the machine has."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    browser = chromium()
    assert browser, "no chromium on PATH (apt install chromium)"
    with tempfile.TemporaryDirectory(prefix="rcnnops-chromium-") as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
               f"--user-data-dir={profile}", "--virtual-time-budget=15000", *args]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def dom(url: str, timeout: float = 120) -> str:
    """The page's DOM once its scripts have run (15 s of virtual time)."""
    out = _run(["--dump-dom", url], timeout)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def screenshot(url: str, path: Path, size: tuple[int, int] = (1400, 900), timeout: float = 120):
    path.parent.mkdir(parents=True, exist_ok=True)
    out = _run([f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", url], timeout)
    assert out.returncode == 0 and path.is_file(), out.stderr[-2000:]
    return path
