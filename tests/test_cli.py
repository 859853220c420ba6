"""The `surge` command line: the main job's offline generation and its errors."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from surge.cli import main


def test_generate_prints_completions_and_throughput(
        tiny_checkpoint: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_checkpoint("tiny-llama")
    code = main(["generate", "--model", str(model), "--max-tokens", "5", "--dtype", "float32",
                 "Hello there", "Another prompt"])
    out = capsys.readouterr().out
    assert code == 0
    assert ">>> Hello there" in out and ">>> Another prompt" in out
    assert "[length, 5 tokens]" in out
    assert "2 requests, 10 output tokens" in out


def test_generate_reports_bad_input_without_a_traceback(
        tiny_checkpoint: Callable[[str], Path], capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_checkpoint("tiny-llama")
    code = main(["generate", "--model", str(model), "--max-tokens", "0", "Hello"])
    err = capsys.readouterr().err
    assert code == 2
    assert "max_tokens=0 is invalid" in err


def test_generate_with_a_missing_model_dir_says_how_to_fix_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["generate", "--model", str(tmp_path / "nope"), "Hello"])
    err = capsys.readouterr().err
    assert code == 2
    assert "config.json" in err and "surge make-model" in err
