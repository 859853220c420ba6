"""The smaller deploy/ files: the systemd unit's and the Ray notes' flags are real `surge serve`
flags with consistent timeouts, and the Grafana dashboard is importable (unique ids)."""

from __future__ import annotations

import json
import re
import shlex

from surge.server.lifecycle import ENGINE_SHUTDOWN_SECONDS
from tests.deploy._files import DASHBOARD, DEPLOY, KUBERNETES, parse_serve


def test_the_systemd_unit_runs_real_flags_and_outwaits_the_drain() -> None:
    unit = (DEPLOY / "surge.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*?[^\\])$", unit, flags=re.MULTILINE | re.DOTALL)
    assert exec_start
    command = shlex.split(exec_start.group(1).replace("\\\n", " "))
    assert command[1:2] == ["serve"], command
    args = parse_serve(command[2:])
    stop = float(re.search(r"^TimeoutStopSec=(\d+)$", unit, flags=re.MULTILINE).group(1))
    assert stop > args.drain_timeout + ENGINE_SHUTDOWN_SECONDS


def test_the_ray_notes_name_real_flags() -> None:
    notes = (KUBERNETES / "ray.md").read_text()
    snippet = re.search(r"`(--backend ray [^`]+)`", notes)
    assert snippet
    args = parse_serve(shlex.split(snippet.group(1)))
    assert args.replica_backend == "ray" and args.max_replicas > args.replicas


def test_the_dashboard_has_unique_ids_and_queries_on_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
