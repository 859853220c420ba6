"""``--stage`` references: built-ins, entry points and module:Class with options; every
mistake is an error that names the reference and what is allowed, at the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from surge.stages.loader import parse_stage
from surge.stages.output_filter import OutputFilter
from surge.stages.pii import PIIRedactor
from tests.stages.sample_stages import Stopper

SAMPLE = "tests.stages.sample_stages"


def test_builtin_by_name_with_options() -> None:
    spec = parse_stage('output-filter:{"words": ["a:b"], "finish_reason": "x"}')
    assert spec.name == "output-filter" and isinstance(spec.stage, OutputFilter)
    assert spec.stage.phrases == ["a:b"] and str(spec) == spec.raw
    assert isinstance(parse_stage("pii-redactor").stage, PIIRedactor)


def test_module_class_with_options_inline_and_from_a_file(tmp_path: Path) -> None:
    spec = parse_stage(f'{SAMPLE}:Stopper:{{"chars": 3}}')
    assert spec.name == "Stopper" and isinstance(spec.stage, Stopper) and spec.stage.chars == 3
    options = tmp_path / "opts.json"
    options.write_text('{"chars": 7}')
    assert parse_stage(f"{SAMPLE}:Stopper:@{options}").stage.chars == 7
    assert parse_stage(f"{SAMPLE}:Scripted").name == "scripted"  # its own name attribute


def test_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dist = tmp_path / "demo_stage-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-stage\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        f"[surge.stages]\nstopper = {SAMPLE}:Stopper\nbroken = no_such_module_x:Y\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = parse_stage('stopper:{"chars": 2}')
    assert isinstance(spec.stage, Stopper) and spec.name == "stopper"
    with pytest.raises(ValueError, match="does not load"):
        parse_stage("broken")


@pytest.mark.parametrize(("value", "message"), [
    ("", "no stage named"),
    ("nope", "no built-in stage or installed 'surge.stages' entry point is named 'nope'"),
    ("no_such_module_q:Thing", "cannot import module 'no_such_module_q'"),
    (f"{SAMPLE}:Missing", "has no attribute 'Missing'"),
    (f"{SAMPLE}:NOT_A_STAGE", "is not a stage"),
    (f"{SAMPLE}:Stopper:{{bad json", "not valid JSON"),
    (f"{SAMPLE}:Stopper:[1, 2]", "must be a JSON object"),
    ("pii-redactor:kinds=email", "must be a JSON object"),
    (f"{SAMPLE}:Stopper:[1]:{{}}", "must be a JSON object"),
    (f'{SAMPLE}:Stopper:"text"', "must be a JSON object"),
    (f"{SAMPLE}:Stopper:{{\"nope\": 1}}", "refused its options"),
    (f"{SAMPLE}:Stopper:@/no/such/file.json", "cannot read the options file"),
    ('pii-redactor:{"kinds": ["ssn"]}', "kinds=['ssn'] is invalid"),
    ('intent-router:{"examples": "/no/such.jsonl"}', "refused its options"),
])
def test_bad_references_are_named(value: str, message: str) -> None:
    with pytest.raises(ValueError, match="--stage") as error:
        parse_stage(value)
    assert message in str(error.value)


def test_the_cli_refuses_a_bad_stage_before_loading_anything() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "surge.cli", "serve", "--stage", "no_such_module_q:Thing"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "argument --stage" in result.stderr
    assert "cannot import module 'no_such_module_q'" in result.stderr
    assert "Traceback" not in result.stderr


def test_replicas_get_the_same_stage_flags() -> None:
    import argparse

    from surge.entrypoints.replicated import replica_serve_args
    from surge.entrypoints.serve import add_serve_args

    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    flags = ["--stage", 'output-filter:{"words": ["a b"]}', "--stage", "pii-redactor"]
    argv = replica_serve_args(parser.parse_args(["--model", "x", *flags]), "/m", ["m"], 1)
    assert [str(spec) for spec in parser.parse_args(argv).stages] == [
        'output-filter:{"words": ["a b"]}', "pii-redactor"]
