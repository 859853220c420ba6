"""Fixtures of the web-apps tests: a `surge serve` with the apps on a tiny checkpoint, and
headless Chromium for the pages (Debian's `chromium`, installed here on first use, because
Playwright's own browser download needs the internet)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.server._helpers import ServerProcess, start_server

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
APT_TIMEOUT_SECONDS = 900
# Screenshots of each page land here (git-ignored), next to the other results.
SCREENSHOT_DIR = Path(__file__).resolve().parents[2] / "results" / "screenshots"


@pytest.fixture(scope="session")
def apps_model_dir(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("tiny-llama")


@pytest.fixture(scope="session")
def apps_server(apps_model_dir: Path, tiny_checkpoint: Callable[[str], Path],
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The shared server with the apps: history in a fresh SQLite file, long answers allowed
    (so a test can stop one mid-answer), and an image classifier for the images page."""
    root = tmp_path_factory.mktemp("apps_server")
    proc = start_server(apps_model_dir, root, "--served-model-name", "tiny",
                        "--extra-model", f"classifier={tiny_checkpoint('tiny-resnet')}",
                        "--database-url", f"sqlite:///{root / 'apps.db'}",
                        # Room for LONG_ANSWER, which tests stop mid-answer.
                        "--chat-max-tokens", "1024", "--max-queued-requests", "512",
                        # The writing assistant's repeats are answered from this cache.
                        "--response-cache", "--response-cache-keep-length",
                        env={"SURGE_DATA_DIR": str(root / "data")})
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    """Debian's chromium, installed with apt-get if it is missing."""
    found = _find_chromium()
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail("the browser tests need Chromium: install it with "
                    "`sudo apt-get install -y chromium` (Debian/Ubuntu), then run the tests again")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env,
                                timeout=APT_TIMEOUT_SECONDS, check=False)
        if result.returncode != 0:
            pytest.fail(f"could not install Chromium for the browser tests: `{' '.join(command)}`"
                        f" exited {result.returncode}:\n{result.stderr[-2000:]}")
    found = _find_chromium()
    if not found:
        pytest.fail("apt-get installed chromium but no executable is at "
                    f"{' or '.join(CHROMIUM_PATHS)}")
    return found


def _find_chromium() -> str | None:
    return next((path for path in CHROMIUM_PATHS if os.access(path, os.X_OK)), None)


# Module scope, not session: Playwright's sync API keeps an event loop running on this thread
# while it is open, and every later test that calls asyncio.run() would then fail.
@pytest.fixture(scope="module")
def browser(chromium_executable: str) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        browser = playwright.chromium.launch(executable_path=chromium_executable, headless=True,
                                             args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def screenshot_dir() -> Path:
    SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
    return SCREENSHOT_DIR
