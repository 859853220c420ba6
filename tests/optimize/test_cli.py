"""`surge optimize` from the command line: bad input refused before any work (exit 2, the
output directory never created), the gate's exit status, and a full run's report and plot."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from surge.cli import main


def _refused(argv: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    assert not out.exists(), "refused before any work: no output directory"
    return capsys.readouterr().err


@pytest.mark.parametrize("extra, says", [
    (["--sparsity", "1.0"], "allowed is a fraction in [0, 1)"),
    (["--sparsity", "-0.5"], "allowed is a fraction in [0, 1)"),
    (["--method", "wanda", "--pattern", "2:4", "--sparsity", "0.3"], "exactly half"),
    (["--gate", "ppl_ratio=1.1"], "METRIC OP NUMBER"),
])
def test_bad_prune_settings_exit_2(tiny_checkpoint: Callable[[str], Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], extra: list[str],
                                   says: str) -> None:
    out = tmp_path / "out"
    model = str(tiny_checkpoint("tiny-llama"))
    err = _refused(["optimize", "prune", "--model", model, "--out", str(out), *extra], out,
                   capsys)
    assert says in err


def test_empty_calibration_file_exits_2(tiny_checkpoint: Callable[[str], Path],
                                        tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    empty, out = tmp_path / "calib.txt", tmp_path / "out"
    empty.write_text("")
    err = _refused(["optimize", "prune", "--model", str(tiny_checkpoint("tiny-llama")),
                    "--calibration", str(empty), "--out", str(out)], out, capsys)
    assert "calib.txt" in err and "is empty" in err


def test_heads_not_divisible_by_kv_heads_exits_2(tiny_checkpoint: Callable[[str], Path],
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "odd"
    shutil.copytree(tiny_checkpoint("tiny-llama"), model)
    config = json.loads((model / "config.json").read_text())
    config["num_key_value_heads"] = 3  # 4 heads
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    err = _refused(["optimize", "prune", "--model", str(model), "--out", str(out)], out, capsys)
    assert "num_attention_heads=4 is not divisible by num_key_value_heads=3" in err


@pytest.mark.parametrize("command", [["quantize", "--method", "int8"], ["prune"]])
def test_a_model_that_is_not_a_causal_lm_exits_2(tiny_checkpoint: Callable[[str], Path],
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str],
                                                 command: list[str]) -> None:
    out = tmp_path / "out"
    err = _refused(["optimize", command[0], "--model", str(tiny_checkpoint("tiny-bert")),
                    *command[1:], "--out", str(out)], out, capsys)
    assert "is not a causal language model" in err


def test_an_output_directory_in_use_exits_2(tiny_checkpoint: Callable[[str], Path],
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["optimize", "quantize", "--model", str(tiny_checkpoint("tiny-llama")),
                 "--method", "int4", "--out", str(out)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_gate_exits_1_when_a_bound_fails(tiny_checkpoint: Callable[[str], Path],
                                         tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pruned"
    code = main(["optimize", "prune", "--model", str(tiny_checkpoint("tiny-llama")),
                 "--sparsity", "0.5", "--calibration-tokens", "256", "--out", str(out),
                 "--quick", "--no-speed", "--no-progress",
                 "--gate", "ppl_ratio<=0.5,params_m_ratio<=0.9"])
    captured = capsys.readouterr()
    assert code == 1
    assert "gate FAILED" in captured.err and "ppl_ratio<=0.5: measured" in captured.err
    assert "params_m_ratio" not in captured.err  # that bound held: the model is smaller
    assert (out / "config.json").is_file()  # the result stays for inspection


@pytest.mark.slow
def test_quantize_end_to_end_prints_the_table_and_plots(
        tiny_checkpoint: Callable[[str], Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "int8"
    code = main(["optimize", "quantize", "--model", str(tiny_checkpoint("tiny-llama")),
                 "--method", "int8", "--out", str(out), "--quick", "--no-progress",
                 "--gate", "ppl_ratio<=1.5,agreement>=0.5,size_mb_ratio<=0.5"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "W4 tok/s" in printed and "gate passed" in printed
    report = json.loads((out / "optimize_report.json").read_text())
    assert report["result"]["label"] == "int8"
    assert report["result"]["w4_tok_s"] > 0 and report["result"]["w1_tok_s"] > 0
    assert report["ratios"]["params_m"] == pytest.approx(1.0)
    # both served in bfloat16: int8 projections halve, embeddings and LM head stay
    assert report["ratios"]["resident_mb"] < 0.8
    assert (out / "variants.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "optimize-variants.jsonl").is_file()


def test_int4_group_size_that_does_not_divide_exits_2(
        tiny_checkpoint: Callable[[str], Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    err = _refused(["optimize", "quantize", "--model", str(tiny_checkpoint("tiny-qwen2")),
                    "--method", "int4", "--group-size", "128", "--out", str(out)], out, capsys)
    assert "--group-size 128 does not divide" in err and "intermediate_size" in err
