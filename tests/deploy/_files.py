"""Paths of deploy/, and reading its files the way their tools do."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

import yaml

from surge.cli import build_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "surge.json"


def kubernetes_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every resource in deploy/kubernetes/*.yaml, with the file it came from."""
    return [(path, document) for path in sorted(KUBERNETES.glob("*.yaml"))
            for document in yaml.safe_load_all(path.read_text()) if document]


def resource(kind: str) -> dict[str, Any]:
    found = [doc for _, doc in kubernetes_documents() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {KUBERNETES}, found {len(found)}"
    return found[0]


def parse_serve(args: list[str]) -> argparse.Namespace:
    """``surge serve ARGS`` parsed by Surge's own parser; a flag it does not know fails."""
    try:
        return build_parser().parse_args(["serve", *args])
    except SystemExit as exc:
        raise AssertionError(f"`surge serve {shlex.join(args)}` does not parse "
                             f"(exit {exc.code})") from None
