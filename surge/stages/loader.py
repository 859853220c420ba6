"""``--stage`` references: a built-in or installed stage by name, or ``module:Class``, each
with options (a JSON object, or ``@file.json``) given to its constructor as keywords.

    --stage pii-redactor
    --stage 'output-filter:{"words": ["darn"]}'
    --stage 'mypkg.stages:Moderation:{"threshold": 0.8}'
    --stage 'intent-router:@router.json'

Installed packages offer stages as entry points of the group ``surge.stages``
(``[project.entry-points."surge.stages"] moderation = "mypkg.stages:Moderation"``); a stage
runs only when a ``--stage`` names it. Every mistake is a ``ValueError`` that names the
reference and what is allowed, raised while the flags are parsed (before any model loads).
"""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

__all__ = ["BUILTIN_STAGES", "ENTRY_POINT_GROUP", "StageSpec", "parse_stage", "stage_arg"]

ENTRY_POINT_GROUP = "surge.stages"
BUILTIN_STAGES = {
    "intent-router": "surge.stages.intent:IntentRouter",
    "pii-redactor": "surge.stages.pii:PIIRedactor",
    "output-filter": "surge.stages.output_filter:OutputFilter",
}
FORMS = ("allowed is NAME[:OPTIONS] (a built-in: " + ", ".join(BUILTIN_STAGES)
         + f", or an installed '{ENTRY_POINT_GROUP}' entry point) or module:Class[:OPTIONS], "
         "OPTIONS a JSON object or @file.json")


@dataclass(frozen=True)
class StageSpec:
    """A parsed ``--stage``: its name and the stage object, built with its options."""

    raw: str
    name: str
    stage: Any

    def __str__(self) -> str:  # how --replicas passes the flag on to each replica
        return self.raw


def stage_arg(value: str) -> StageSpec:
    """``argparse`` type of ``--stage``: a mistake is a usage error naming the flag."""
    try:
        return parse_stage(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def parse_stage(value: str) -> StageSpec:
    ref, options = _split(value)
    where = f"--stage {value!r}"
    if not ref:
        raise ValueError(f"{where}: no stage named: {FORMS}")
    head, _, rest = ref.partition(":")
    if ":" in rest or (rest and head in BUILTIN_STAGES):
        raise ValueError(f"{where}: the options must be a JSON object ({{...}}) or "
                         f"@file.json; {FORMS}")
    if ":" in ref:
        target, name = _import(ref, where), ref.rsplit(":", 1)[1].rsplit(".", 1)[-1]
    else:
        target, name = _named(ref, where), ref
    stage = _build(target, _options(options, where), where)
    name = str(getattr(stage, "name", None) or name)
    if not (callable(getattr(stage, "before", None)) or callable(getattr(stage, "open", None))):
        raise ValueError(f"{where}: {type(stage).__name__} is not a stage: it needs a "
                         "before(request) method (a pre-stage) or open(request) (a "
                         "post-stage); see surge.stages.api")
    return StageSpec(value, name, stage)


def _split(value: str) -> tuple[str, str | None]:
    """The reference and its options: they start at the first ':{' or ':@' (a module path
    has neither brace nor at-sign)."""
    starts = [i for i in (value.find(":{"), value.find(":@")) if i >= 0]
    if not starts:
        return value.strip(), None
    cut = min(starts)
    return value[:cut].strip(), value[cut + 1:]


def _import(ref: str, where: str) -> Any:
    module_name, _, attribute = ref.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{where}: {FORMS}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is the reference's problem, named
        raise ValueError(f"{where}: cannot import module {module_name!r} "
                         f"({type(exc).__name__}: {exc})") from exc
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{where}: module {module_name!r} has no attribute "
                             f"{attribute!r}")
        target = getattr(target, part)
    return target


def _named(name: str, where: str) -> Any:
    if name in BUILTIN_STAGES:
        return _import(BUILTIN_STAGES[name], where)
    installed = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    if name not in installed:
        known = ", ".join(sorted({*BUILTIN_STAGES, *installed}))
        raise ValueError(f"{where}: no built-in stage or installed '{ENTRY_POINT_GROUP}' "
                         f"entry point is named {name!r} (known: {known}); {FORMS}")
    try:
        return installed[name].load()
    except Exception as exc:
        raise ValueError(f"{where}: the entry point {installed[name].value!r} does not load "
                         f"({type(exc).__name__}: {exc})") from exc


def _options(text: str | None, where: str) -> dict[str, Any]:
    if text is None:
        return {}
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            text = path.read_text()
        except OSError as exc:
            raise ValueError(f"{where}: cannot read the options file {str(path)!r} "
                             f"({exc.strerror or exc})") from exc
    try:
        options = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: the options are not valid JSON ({exc}): allowed is a "
                         "JSON object of the stage's keyword arguments") from exc
    if not isinstance(options, dict):
        raise ValueError(f"{where}: the options are a JSON {type(options).__name__}: "
                         "allowed is a JSON object of the stage's keyword arguments")
    return options


def _build(target: Any, options: dict[str, Any], where: str) -> Any:
    is_instance = not isinstance(target, type) and (hasattr(target, "before")
                                                     or hasattr(target, "open"))
    if is_instance or not callable(target):
        if options:  # an instance: nothing to give options to
            raise ValueError(f"{where}: {target!r} is an object, not a class: it takes no "
                             "options")
        return target
    try:
        return target(**options)
    except (TypeError, ValueError, OSError) as exc:
        raise ValueError(f"{where}: the stage refused its options: {exc}") from exc
