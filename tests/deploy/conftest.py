"""Fixtures of the deploy/ tests: Prometheus and promtool from Debian's `prometheus` package,
installed here on first use (when missing and root), as tests/apps installs Chromium."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

APT_TIMEOUT_SECONDS = 900


@pytest.fixture(scope="session")
def prometheus_binaries() -> tuple[str, str]:
    """(prometheus, promtool), installing Debian's `prometheus` package if they are missing."""
    found = _find()
    if found:
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.fail("the deploy/ tests need Prometheus and promtool: install them with "
                    "`sudo apt-get install -y prometheus` (Debian/Ubuntu), then run the tests "
                    "again")
    # policy-rc.d in containers stops the package's service from starting; either way the
    # tests start their own Prometheus on a free port.
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"],
                    ["apt-get", "install", "-y", "--no-install-recommends", "prometheus"]):
        result = subprocess.run(command, capture_output=True, text=True, env=env,
                                timeout=APT_TIMEOUT_SECONDS, check=False)
        if result.returncode != 0:
            pytest.fail(f"could not install Prometheus for the deploy tests: "
                        f"`{' '.join(command)}` exited {result.returncode}:\n"
                        f"{result.stderr[-2000:]}")
    found = _find()
    if not found:
        pytest.fail("apt-get installed prometheus but prometheus or promtool is not on PATH")
    return found


def _find() -> tuple[str, str] | None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    return (prometheus, promtool) if prometheus and promtool else None
