"""The student of a distillation: what ``--student SPEC`` means, and its initial weights.

A SPEC is one of

- ``layers=N``: N of the teacher's layers, evenly spaced, always keeping the first and last;
- ``drop:everyK``: the teacher without every K-th layer (``drop:every2`` drops layers 1, 3,
  5, ...: half of them);
- ``keep:0,2,5``: exactly these teacher layers, in this order;
- any of those plus ``mlp=F`` (comma-separated, e.g. ``layers=15,mlp=0.5``): each kept
  layer's MLP narrowed to a fraction F of its channels, keeping the channels whose weights
  have the largest norms;
- ``mlp=F`` alone: every layer kept, only narrowed;
- ``preset:NAME`` (or a bare `surge make-model` preset name such as ``tiny-llama``): that
  architecture shape with its own seeded random weights;
- a checkpoint directory: that model as it is.

Students derived from the teacher start from the teacher's weights (embeddings, norms, head
and the kept layers), which is what makes a few minutes of distillation enough to recover
most of the quality. Every student must use the teacher's vocabulary: a student with another
vocabulary size or another tokenizer is refused before anything is trained.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surge.optimize.trainable import TrainableDecoder

__all__ = ["StudentPlan", "build_student", "directory_vocab", "parse_student_spec",
           "student_hf_config"]


@dataclass(frozen=True)
class StudentPlan:
    """A parsed SPEC. ``layers`` None keeps every teacher layer; ``mlp`` 1.0 keeps every channel."""

    kind: str  # "derived", "preset" or "directory"
    layers: tuple[int, ...] | None = None
    mlp: float = 1.0
    preset: str | None = None
    directory: Path | None = None
    spec: str = ""
    notes: list[str] = field(default_factory=list)


def parse_student_spec(spec: str, teacher_layers: int) -> StudentPlan:
    """The plan a SPEC describes for a teacher of ``teacher_layers`` layers (ValueError if bad)."""
    from surge.testing.make_model import PRESETS

    text = spec.strip()
    if not text:
        raise ValueError(_usage("--student is empty"))
    if text.startswith("preset:") or text in PRESETS:
        name = text.removeprefix("preset:")
        if name not in PRESETS:
            raise ValueError(f"--student preset {name!r} is unknown; presets: "
                             f"{', '.join(sorted(PRESETS))}")
        return StudentPlan("preset", preset=name, spec=text)
    if Path(text).expanduser().is_dir():
        return StudentPlan("directory", directory=Path(text).expanduser(), spec=text)
    layers: tuple[int, ...] | None = None
    mlp = 1.0
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part.startswith("mlp="):
            mlp = _fraction(part)
        elif layers is None:
            layers = _layers(part, text, teacher_layers)
        elif re.fullmatch(r"\d+", part) and text.startswith("keep:"):
            continue  # the rest of a keep: list, already read
        else:
            raise ValueError(_usage(f"--student {spec!r} names the layers twice"))
    if layers is None and mlp == 1.0:
        raise ValueError(_usage(f"--student {spec!r} changes nothing"))
    return StudentPlan("derived", layers=layers, mlp=mlp, spec=text)


def _layers(part: str, whole: str, teacher_layers: int) -> tuple[int, ...]:
    if m := re.fullmatch(r"layers=(\d+)", part):
        n = int(m.group(1))
        if not 1 <= n <= teacher_layers:
            raise ValueError(f"--student layers={n} is invalid: allowed is 1 to the teacher's "
                             f"{teacher_layers} layers")
        if n == 1:
            return (0,)
        # Evenly spaced, first and last always kept (the embedding and head rely on them).
        step = (teacher_layers - 1) / (n - 1)  # >= 1, so the rounded indices are distinct
        return tuple(math.floor(i * step + 0.5) for i in range(n))
    if m := re.fullmatch(r"drop:every(\d+)", part):
        k = int(m.group(1))
        if k < 2:
            raise ValueError(f"--student drop:every{k} is invalid: allowed is every2 or more")
        return tuple(i for i in range(teacher_layers) if (i + 1) % k != 0)
    if part.startswith("keep:"):
        listed = re.findall(r"keep:([\d,\s]+)", whole)
        try:
            keep = tuple(int(x) for x in listed[0].split(",") if x.strip())
        except (IndexError, ValueError):
            raise ValueError(_usage(f"--student {whole!r}: keep: takes layer numbers")) from None
        bad = [i for i in keep if not 0 <= i < teacher_layers]
        if not keep or bad or len(set(keep)) != len(keep):
            raise ValueError(f"--student {whole!r}: layers must be distinct numbers from 0 to "
                             f"{teacher_layers - 1}")
        return keep
    raise ValueError(_usage(f"--student part {part!r} is not understood"))


def _fraction(part: str) -> float:
    try:
        value = float(part.removeprefix("mlp="))
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise ValueError(f"--student {part!r} is invalid: mlp= takes a fraction in (0, 1], "
                         "e.g. mlp=0.5 keeps half of each MLP's channels")
    return value


def _usage(problem: str) -> str:
    return (f"{problem}; a student SPEC is layers=N, drop:everyK, keep:0,2,5 (optionally with "
            ",mlp=F), mlp=F, preset:NAME, or a checkpoint directory")


# -- building ---------------------------------------------------------------------------------

def build_student(plan: StudentPlan, teacher: TrainableDecoder,
                  teacher_vocab: dict[str, int] | None, seed: int) -> TrainableDecoder:
    """The student model, initialised as the plan says, on the teacher's device, float32."""
    if plan.kind == "preset":
        student = _preset_student(plan, teacher, seed)
    elif plan.kind == "directory":
        student = _directory_student(plan, teacher, teacher_vocab)
    else:
        student = _derived_student(plan, teacher)
    return student.float()


def student_hf_config(plan: StudentPlan, teacher_hf: dict[str, Any],
                      teacher: TrainableDecoder) -> dict[str, Any]:
    """config.json of a derived student: the teacher's, with fewer layers or channels."""
    hf = dict(teacher_hf)
    if plan.layers is not None:
        hf["num_hidden_layers"] = len(plan.layers)
        if "max_window_layers" in hf:  # Qwen2/3: must not exceed the layer count
            hf["max_window_layers"] = min(hf["max_window_layers"], len(plan.layers))
    if plan.mlp < 1.0:
        hf["intermediate_size"] = _narrow_width(teacher.config.intermediate_size, plan.mlp)
    return hf


def _narrow_width(size: int, fraction: float) -> int:
    # A multiple of 8 keeps GEMMs aligned; never below 8 or above the original.
    return min(size, max(8, round(size * fraction / 8) * 8))


def _derived_student(plan: StudentPlan, teacher: TrainableDecoder) -> TrainableDecoder:
    hf = student_hf_config(plan, teacher.hf_config, teacher)
    student = TrainableDecoder(hf, "student").to(teacher.lm_head.weight.device)
    keep = plan.layers if plan.layers is not None else tuple(range(teacher.config.num_layers))
    width = student.config.intermediate_size
    with torch.no_grad():
        student.model.embed_tokens.weight.copy_(teacher.model.embed_tokens.weight)
        student.model.norm.weight.copy_(teacher.model.norm.weight)
        if not student.config.tie_word_embeddings:
            student.lm_head.weight.copy_(teacher.lm_head.weight)
        for new, old in zip(student.model.layers, (teacher.model.layers[i] for i in keep),
                            strict=True):
            _copy_layer(new, old, width)
    return student


def _copy_layer(new: torch.nn.Module, old: torch.nn.Module, width: int) -> None:
    """Copy one layer; a narrower MLP keeps the channels with the largest weight norms
    (gate row x up row x down column: the channel's whole path through the MLP)."""
    mlp_old, mlp_new = old.mlp, new.mlp
    channels = torch.arange(mlp_old.gate_proj.out_features, device=mlp_old.gate_proj.weight.device)
    if width < channels.numel():
        score = (mlp_old.gate_proj.weight.norm(dim=1) * mlp_old.up_proj.weight.norm(dim=1)
                 * mlp_old.down_proj.weight.norm(dim=0))
        channels = score.topk(width).indices.sort().values
    skipped = {f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
    new_params = dict(new.named_parameters())
    for name, param in old.named_parameters():
        if name not in skipped:
            new_params[name].copy_(param)
    mlp_new.gate_proj.weight.copy_(mlp_old.gate_proj.weight[channels])
    mlp_new.up_proj.weight.copy_(mlp_old.up_proj.weight[channels])
    mlp_new.down_proj.weight.copy_(mlp_old.down_proj.weight[:, channels])


def _preset_student(plan: StudentPlan, teacher: TrainableDecoder, seed: int) -> TrainableDecoder:
    from surge.testing.make_model import PRESETS, generate_weights

    preset = PRESETS[plan.preset or ""]
    _check_vocab_size(preset.vocab_size, teacher.config.vocab_size, f"preset {preset.name}")
    student = TrainableDecoder(preset.config, "student")
    student.load_tensors(generate_weights(preset, seed).items())
    return student.to(teacher.lm_head.weight.device)


def _directory_student(plan: StudentPlan, teacher: TrainableDecoder,
                       teacher_vocab: dict[str, int] | None) -> TrainableDecoder:
    from surge.models.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(plan.directory or Path())
    hf = checkpoint.read_config()
    _check_vocab_size(int(hf.get("vocab_size", -1)), teacher.config.vocab_size,
                      f"checkpoint {plan.directory}")
    student_vocab = directory_vocab(plan.directory or Path())
    if teacher_vocab is not None and student_vocab is not None and student_vocab != teacher_vocab:
        differing = sum(1 for tok, i in student_vocab.items() if teacher_vocab.get(tok) != i)
        raise ValueError(f"the student {plan.directory} has another tokenizer than the teacher "
                         f"({differing} tokens map to different ids): a student must share the "
                         "teacher's vocabulary")
    student = TrainableDecoder(hf, "student")
    student.load_tensors(checkpoint.iter_tensors())
    return student.to(teacher.lm_head.weight.device)


def _check_vocab_size(student: int, teacher: int, what: str) -> None:
    if student != teacher:
        raise ValueError(f"the student ({what}) has a vocabulary of {student} tokens, the "
                         f"teacher {teacher}: a student must share the teacher's vocabulary "
                         "(same tokenizer, same size)")


def directory_vocab(directory: Path) -> dict[str, int] | None:
    """token -> id of a checkpoint directory's tokenizer.json (None when it has none)."""
    if not (directory / "tokenizer.json").is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(
        with_added_tokens=True)
