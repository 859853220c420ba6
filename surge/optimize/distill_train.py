"""The training loop of `surge optimize distill`, for one process or data-parallel ranks.

One optimizer step consumes a global batch of ``batch_size`` sequences, whatever the number of
processes: each of ``world`` ranks takes ``batch_size / world`` of them, in micro-batches of
``micro_batch`` with gradient accumulation. Every loss is a sum divided by the number of
target tokens in the whole global batch (known on every rank, which holds all the data), and
DistributedDataParallel averages gradients over ranks, so the update equals one process
training on the same global batch (tested with gloo on CPU).

The training state (student, AdamW, schedule, step, RNG) is saved every ``checkpoint_every``
steps to ``OUT/.distill/state.pt``, written to a temporary file and renamed over the old one:
an interrupted run leaves its last checkpoint whole, and ``--resume`` continues at that step.
Which samples a step takes depends only on (seed, step), so the data position needs no state
of its own.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surge.optimize.distill_data import Example, batch_tensors, sample_indices
from surge.optimize.distill_loss import distill_loss

__all__ = ["STATE_DIR", "DistillJob", "TrainSettings", "TrainSummary", "run_worker", "train"]

STATE_DIR = ".distill"  # inside --out: data.pt, state.pt
STATE_FORMAT = 1
_PLAN_PROBE_STEPS = 3  # steps timed before a --max-minutes run fixes its planned length


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 200
    batch_size: int = 8  # sequences per optimizer step, over all processes
    micro_batch: int = 4  # sequences per forward pass on one process
    seq_len: int = 256
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # the cosine ends at lr x this
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    alpha: float = 0.5
    temperature: float = 2.0
    kl: str = "forward"
    precision: str = "bf16"  # autocast dtype of forward passes ("fp32": none)
    seed: int = 0

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint."""
        return asdict(self)


@dataclass(frozen=True)
class DistillJob:
    """Everything a training process needs, picklable for `torch.multiprocessing.spawn`."""

    teacher: str  # resolved path: checkpoint directory or .gguf
    student_spec: str
    out: str
    settings: TrainSettings
    device: str = "cpu"  # "cpu" or "cuda"
    world: int = 1
    resume: bool = False
    checkpoint_every: int = 50
    max_minutes: float | None = None
    progress: bool = True
    save_dtype: str = "auto"
    teacher_vocab: dict[str, int] | None = field(default=None, repr=False)

    @property
    def state_dir(self) -> Path:
        return Path(self.out) / STATE_DIR


@dataclass
class TrainSummary:
    start_step: int
    end_step: int
    planned_steps: int
    seconds: float
    tokens: int  # tokens fed through the student, all ranks
    stopped_by_time: bool
    losses: list[dict[str, float]]  # per step: step, loss, ce, kd, lr


# -- process group --------------------------------------------------------------------------

def run_worker(rank: int, job: DistillJob, port: int) -> None:
    """Entry of each `--nproc` process: join the group on loopback, train, leave."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    if job.device == "cpu":  # the ranks share the cores; oversubscribed they would all crawl
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.world))
    _init_group(rank, job.world, job.device)
    try:
        train(job, rank)
    finally:
        torch.distributed.destroy_process_group()


def _init_group(rank: int, world: int, device: str) -> None:
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


# -- the loop ---------------------------------------------------------------------------------

def train(job: DistillJob, rank: int = 0,
          on_step: Callable[[int], None] | None = None) -> TrainSummary:
    """Train the student of ``job`` (data in ``OUT/.distill/data.pt``); rank 0 saves the
    checkpoints. ``on_step(step)`` runs after each completed step (step counts from 1)."""
    from surge.optimize.distill import load_models  # distill.py builds the models

    s = job.settings
    world = torch.distributed.get_world_size() if _distributed() else 1
    device = _device(job.device, rank)
    examples: list[Example] = torch.load(job.state_dir / "data.pt", weights_only=False)
    accum = _accumulation(s, world)
    torch.manual_seed(s.seed)
    teacher, student = load_models(job, device)
    model = _wrap(student, device)
    optimizer = _adamw(student, s)
    plan = {"steps": s.steps}
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, s, plan["steps"]))
    start = _restore(job, student, optimizer, scheduler, plan, len(examples)) if job.resume else 0
    pad = 0
    summary = TrainSummary(start, start, plan["steps"], 0.0, 0, False, [])
    bar = _progress_bar(job, rank, start, plan["steps"])
    began = time.perf_counter()
    step = start
    while step < plan["steps"]:
        batch = sample_indices(len(examples), s.seed, step * s.batch_size, s.batch_size)
        chosen = [examples[i] for i in batch]
        count = sum(e.targets for e in chosen)  # global normaliser, same on every rank
        mine = chosen[rank * s.batch_size // world:(rank + 1) * s.batch_size // world]
        totals = torch.zeros(3, device=device)  # loss, ce, kd sums (this rank)
        for a in range(accum):
            micro = mine[a * s.micro_batch:(a + 1) * s.micro_batch]
            ids, mask = batch_tensors(micro, pad, device)
            sync = a == accum - 1
            with _maybe_no_sync(model, sync):
                parts = _forward(model, teacher, ids, mask, s, device)
                # DDP averages gradients over ranks: x world turns that into the global sum.
                (parts.total * (world / max(count, 1))).backward()
            totals += torch.stack((parts.total.detach(), parts.ce, parts.kd))
            summary.tokens += int(ids.numel()) * world
        if s.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(student.parameters(), s.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if _distributed():
            torch.distributed.all_reduce(totals)
        record = {"step": step, "loss": totals[0].item() / count, "ce": totals[1].item() / count,
                  "kd": totals[2].item() / count, "lr": scheduler.get_last_lr()[0]}
        summary.losses.append(record)
        elapsed = time.perf_counter() - began
        _show(bar, record, summary.tokens, elapsed)
        if job.max_minutes is not None:
            _plan_steps(plan, step - start, step, elapsed, job.max_minutes * 60, device)
        stop = _time_is_up(job, elapsed, device)
        if rank == 0 and (step % job.checkpoint_every == 0 or step >= plan["steps"] or stop):
            save_state(job, student, optimizer, scheduler, plan, step, len(examples))
        if on_step is not None:
            on_step(step)
        if stop:
            summary.stopped_by_time = True
            break
    if bar is not None:
        bar.close()
    summary.end_step, summary.planned_steps = step, plan["steps"]
    summary.seconds = time.perf_counter() - began
    if rank == 0:
        from surge.optimize.distill import export_student

        export_student(job, student)
        _write_summary(job, summary)
    return summary


def _device(kind: str, rank: int) -> torch.device:
    if kind == "cuda":
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device(kind)


def _accumulation(s: TrainSettings, world: int) -> int:
    per_rank, rest = divmod(s.batch_size, world)
    if rest or per_rank % s.micro_batch:
        raise ValueError(f"--batch-size {s.batch_size} must split into {world} process(es) x "
                         f"whole micro-batches of {s.micro_batch} (--micro-batch)")
    return per_rank // s.micro_batch


def _wrap(student: nn.Module, device: torch.device) -> nn.Module:
    if not _distributed():
        return student
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(student, device_ids=ids)


def _maybe_no_sync(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Gradient accumulation: DDP all-reduces only on the last micro-batch of a step."""
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def _forward(model: nn.Module, teacher: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
             s: TrainSettings, device: torch.device) -> Any:
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.precision == "bf16")
    with autocast:
        student_logits = model(ids)
        with torch.no_grad():
            teacher_logits = teacher(ids) if s.alpha < 1.0 else student_logits
    return distill_loss(student_logits, teacher_logits, ids, mask, s.alpha, s.temperature, s.kl)


def _adamw(student: nn.Module, s: TrainSettings) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-D tensors), as is usual."""
    decay = [p for p in student.parameters() if p.ndim >= 2]
    rest = [p for p in student.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": s.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.95), eps=1e-8)


def _lr_factor(step: int, s: TrainSettings, planned: int) -> float:
    """Linear warmup to 1, then a cosine down to ``min_lr_ratio`` at the planned last step."""
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    span = max(1, planned - s.warmup_steps)
    progress = min(1.0, (step - s.warmup_steps) / span)
    return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _plan_steps(plan: dict[str, int], done: int, step: int, elapsed: float, budget: float,
                device: torch.device) -> None:
    """With --max-minutes: once a few steps are timed, end the cosine where time will run out
    (fixed from then on, and saved, so a resumed run keeps the same schedule)."""
    if done != _PLAN_PROBE_STEPS or "fixed" in plan:
        return
    per_step = torch.tensor([elapsed / done], device=device)
    if _distributed():
        torch.distributed.all_reduce(per_step, op=torch.distributed.ReduceOp.MAX)
    fits = step + int((budget - elapsed) / per_step.item())
    plan["steps"] = max(step, min(plan["steps"], fits))
    plan["fixed"] = 1


def _time_is_up(job: DistillJob, elapsed: float, device: torch.device) -> bool:
    """Rank 0's clock decides for everyone, so every rank stops after the same step."""
    if job.max_minutes is None:
        return False
    flag = torch.tensor([1.0 if elapsed >= job.max_minutes * 60 else 0.0], device=device)
    if _distributed():
        torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def _progress_bar(job: DistillJob, rank: int, start: int, total: int) -> Any:
    if rank != 0 or not job.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="distill", unit="step", dynamic_ncols=True)


def _show(bar: Any, record: dict[str, float], tokens: int, elapsed: float) -> None:
    if bar is None:
        return
    bar.update(1)
    bar.set_postfix(loss=f"{record['loss']:.3f}", ce=f"{record['ce']:.3f}",
                    kd=f"{record['kd']:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):.0f}",
                    lr=f"{record['lr']:.2e}")


# -- checkpoints ------------------------------------------------------------------------------

def save_state(job: DistillJob, student: nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, plan: dict[str, int], step: int, num_examples: int) -> Path:
    """Write the training state atomically: a temporary file, fsync, then rename over."""
    state = {
        "format": STATE_FORMAT,
        "step": step,
        "samples_seen": step * job.settings.batch_size,
        "plan": dict(plan),
        "fingerprint": _fingerprint(job, num_examples),
        "student": {k: v.detach().cpu() for k, v in student.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    path = job.state_dir / "state.pt"
    tmp = path.with_name(f".state.pt.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_state(job: DistillJob) -> dict[str, Any]:
    path = job.state_dir / "state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}; start without --resume")
    return torch.load(path, map_location="cpu", weights_only=False)


def check_resumable(job: DistillJob, num_examples: int) -> int:
    """The step a --resume run continues at, or a ValueError when the settings differ."""
    state = load_state(job)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{job.state_dir / 'state.pt'} was written by another version of "
                         "`surge optimize distill`; start a new --out")
    saved, now = state["fingerprint"], _fingerprint(job, num_examples)
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        raise ValueError("--resume: the checkpoint was trained with other settings ("
                         + ", ".join(f"{k}: {saved.get(k)!r} then, {now.get(k)!r} now"
                                     for k in differ) + "); use the same ones or a new --out")
    return int(state["step"])


def _restore(job: DistillJob, student: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: Any, plan: dict[str, int], num_examples: int) -> int:
    check_resumable(job, num_examples)
    state = load_state(job)
    student.load_state_dict(state["student"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    plan.clear()
    plan.update(state["plan"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return int(state["step"])


def _fingerprint(job: DistillJob, num_examples: int) -> dict[str, Any]:
    return {"teacher": str(job.teacher), "student": job.student_spec,
            "examples": num_examples, **job.settings.fingerprint()}


def _write_summary(job: DistillJob, summary: TrainSummary) -> None:
    path = Path(job.out) / "distill_summary.json"
    data = {"teacher": job.teacher, "student": job.student_spec, "world": job.world,
            "device": job.device, "settings": job.settings.fingerprint(), **asdict(summary)}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
