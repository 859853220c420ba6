"""`surge eval` on the command line: the side-by-side table, JSON, and bad input."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from surge.cli import main

SUITE = ('{"prompt": "Hello", "expected": "zebra", "max_tokens": 4}\n'
         '{"prompt": "Count: 1 2 3", "expected": "4", "chat": false, "max_tokens": 4}\n')


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["eval", "--device", "cpu", "--no-progress", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def suite(tmp_path: Path) -> Path:
    path = tmp_path / "suite.jsonl"
    path.write_text(SUITE, encoding="utf-8")
    return path


@pytest.mark.slow
def test_against_prints_both_columns_and_writes_json(
        tiny_checkpoint: Callable[[str], Path], other_seed_llama: Path, suite: Path,
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_checkpoint("tiny-llama")
    out_json = tmp_path / "report.json"
    code, out, _ = run(capsys, "--model", model, "--dtype", "float32", "--against",
                       other_seed_llama, "--against-dtype", "float32", "--prompts", suite,
                       "--max-tokens", "200", "--context-length", "64", "--json", out_json)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"model: {model} (dtype=float32")
    assert lines[1].startswith(f"against: {other_seed_llama} (dtype=float32")
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split() == ["metric", "model", "against", "ratio"]
    ppl_row = next(line for line in lines if line.startswith("perplexity ")).split()
    assert float(ppl_row[1]) / float(ppl_row[2]) == pytest.approx(float(ppl_row[3]), rel=0.01)
    assert any(line.startswith("prompt accuracy") and "(0/2)" in line for line in lines)
    assert any(line.startswith("mean KL, nats (text)") for line in lines)
    report = json.loads(out_json.read_text())
    assert report["model"]["perplexity"]["num_tokens"] == 199
    assert report["against"]["prompts"]["num_prompts"] == 2
    assert report["ratios"]["perplexity"] == pytest.approx(
        report["model"]["perplexity"]["perplexity"]
        / report["against"]["perplexity"]["perplexity"])
    assert set(report["agreement"]) == {"text", "prompts"}
    assert 0 <= report["agreement"]["prompts"]["identical_answers"] <= 1


def test_one_model_prints_one_column(tiny_checkpoint: Callable[[str], Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20, encoding="utf-8")
    code, out, _ = run(capsys, "--model", tiny_checkpoint("tiny-gpt2"), "--text", text,
                       "--no-prompts", "--context-length", "32")
    assert code == 0
    assert f"text {text}" in out.splitlines()[0]
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "model"]
    assert "agreement" not in out and "prompt accuracy" not in out


def test_quantized_model_against_its_float_self(tiny_checkpoint: Callable[[str], Path],
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The quality gate of a quantization: --quantization int8 --against the same model."""
    model = tiny_checkpoint("tiny-llama")
    out_json = tmp_path / "report.json"
    code, _, _ = run(capsys, "--model", model, "--dtype", "float32", "--quantization", "int8",
                     "--against", model, "--no-prompts", "--max-tokens", "200",
                     "--context-length", "64", "--json", out_json)
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["model"]["model"]["quantization"] == "int8"
    assert "quantization" not in report["against"]["model"]
    # int8 weights move each logit a little: close to the float model, but not identical.
    assert report["ratios"]["perplexity"] == pytest.approx(1.0, rel=0.05)
    assert 0 < report["agreement"]["text"]["mean_kl"] < 0.05


@pytest.mark.parametrize(("make_args", "message"), [
    (lambda d, tmp: ["--model", tmp / "missing"], "model '.*missing' not found"),
    (lambda d, tmp: ["--model", d, "--against", tmp / "other"], "model '.*other' not found"),
    (lambda d, tmp: ["--model", d, "--text", tmp / "none.txt"], r"none\.txt' not found"),
    (lambda d, tmp: ["--model", d, "--text", _write(tmp / "empty.txt", " \n")], "is empty"),
    (lambda d, tmp: ["--model", d, "--text", _write(tmp / "one.txt", "a"), "--no-prompts"],
     r"1 token\(s\) long"),
    (lambda d, tmp: ["--model", d, "--prompts", _write(tmp / "bad.jsonl", SUITE + "{oops\n")],
     r"bad\.jsonl, line 3: not valid JSON"),
    (lambda d, tmp: ["--model", d, "--no-perplexity", "--context-length", "16", "--prompts",
                     _write(tmp / "long.jsonl", '{"prompt": "a b c d e f g h", "expected": "x"}')],
     r"prompt on line 1 is \d+ tokens; with its max_tokens=32 that exceeds the context of 16"),
    (lambda d, tmp: ["--model", d, "--no-prompts", "--no-perplexity"], "nothing to evaluate"),
    (lambda d, tmp: ["--model", d, "--max-tokens", "1"], "max_tokens=1 is invalid"),
    (lambda d, tmp: ["--model", d, "--stride", "4096"], "stride=4096 is invalid"),
])
def test_bad_input_is_a_clear_error(tiny_checkpoint: Callable[[str], Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str],
                                    make_args: Callable[[Path, Path], list], message: str
                                    ) -> None:
    code, out, err = run(capsys, *make_args(tiny_checkpoint("tiny-llama"), tmp_path))
    assert code == 2 and not out
    assert err.startswith("surge: error: ")
    assert re.search(message, err), err


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
