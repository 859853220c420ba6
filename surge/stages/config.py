"""`surge serve`'s ``--stage`` flag and the stages plugin. Light on imports: the stages
package loads its pipeline only when a ``--stage`` is given."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from surge.stages.loader import BUILTIN_STAGES, ENTRY_POINT_GROUP, stage_arg

if TYPE_CHECKING:
    from surge.server.app import ServerSettings
    from surge.stages.feature import StagesFeature

__all__ = ["StagesPlugin"]


class StagesPlugin:
    """A ``surge.server.features.FeaturePlugin``."""

    def add_args(self, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group(
            "request stages", "code that sees each generation request before admission (and "
            "may change, answer, route or refuse it) and its text as it streams (and may "
            "change it or stop it); each stage's time is in surge:stage_duration_seconds")
        group.add_argument(
            "--stage", action="append", default=[], type=stage_arg, dest="stages",
            metavar="NAME|module:Class[:OPTIONS]",
            help="add a stage (repeatable; they run in the order given): a built-in ("
                 + ", ".join(BUILTIN_STAGES) + f"), an installed '{ENTRY_POINT_GROUP}' entry "
                 "point, or module:Class; OPTIONS is a JSON object of its keyword arguments "
                 "or @file.json")

    def from_args(self, args: argparse.Namespace, settings: ServerSettings,
                  model_dir: str) -> StagesFeature | None:
        if not args.stages:
            return None
        from surge.stages.feature import StagesFeature

        return StagesFeature(list(args.stages))
