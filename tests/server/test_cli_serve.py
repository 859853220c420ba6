"""`surge serve` refuses bad set-ups before it listens, with a message that says the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surge.cli", "serve", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.timeout(60)
def test_missing_model_dir_exits_2_naming_it(tmp_path: Path) -> None:
    result = _serve("--model", str(tmp_path / "nope"), "--port", "0")
    assert result.returncode == 2
    assert "config.json not found" in result.stderr and "Hugging Face layout" in result.stderr


@pytest.mark.timeout(60)
def test_bad_limit_exits_2(model_dir: Path) -> None:
    result = _serve("--model", str(model_dir), "--max-queued-requests", "0")
    assert result.returncode == 2
    assert "--max-queued-requests=0 is invalid" in result.stderr


@pytest.mark.timeout(60)
def test_help_lists_the_serving_flags() -> None:
    result = _serve("--help")
    for flag in ("--api-key", "--max-queued-requests", "--max-queued-tokens", "--drain-timeout",
                 "--request-timeout", "--rate-limit-rpm", "--max-body-bytes", "--engine-mode",
                 "--no-engine-restart", "--served-model-name", "--max-num-seqs", "--dtype"):
        assert flag in result.stdout, flag
