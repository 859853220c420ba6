"""`surge optimize distill`: train a smaller student on a teacher's outputs, then gate it.

The steps, each refusing bad input before the next costs anything:

1. check the loss settings, the teacher (a float causal LM of the Llama family), the student
   SPEC (`surge.optimize.student`) and that the student shares the teacher's vocabulary;
2. prepare the data (`surge.optimize.distill_data`): text blocks, and the teacher's answers to
   a JSONL of prompts generated with Surge's offline engine; saved to ``OUT/.distill/data.pt``
   so a resumed run trains on exactly the same sequences;
3. train (`surge.optimize.distill_train`), in this process or in ``--nproc`` data-parallel
   processes (or the ranks `torchrun` started);
4. write the student as a Hugging Face directory (config.json, model.safetensors, tokenizer,
   chat template) that `surge serve --model OUT` and transformers load;
5. run the quality gate of `surge.optimize.gate` against the teacher.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from surge.optimize.distill_data import Example, load_examples
from surge.optimize.distill_loss import check_loss_settings
from surge.optimize.distill_train import (
    DistillJob,
    TrainSettings,
    check_resumable,
    run_worker,
    train,
)
from surge.optimize.student import (
    StudentPlan,
    build_student,
    directory_vocab,
    parse_student_spec,
)
from surge.optimize.trainable import TrainableDecoder

__all__ = ["GenerationSettings", "distill", "export_student", "load_models", "prepare_job"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class GenerationSettings:
    """How the teacher answers JSONL prompts (greedy by default: its most likely answer)."""

    def __init__(self, max_tokens: int = 256, temperature: float = 0.0, seed: int = 0):
        if max_tokens < 1:
            raise ValueError(f"--gen-max-tokens {max_tokens} is invalid: allowed is 1 or more")
        if temperature < 0:
            raise ValueError(f"--gen-temperature {temperature} is invalid: allowed is >= 0")
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed


def prepare_job(teacher: str, student: str, out: str, data: list[str],
                settings: TrainSettings, *, nproc: int = 1, device: str = "auto",
                resume: bool = False, checkpoint_every: int = 50,
                max_minutes: float | None = None, progress: bool = True,
                save_dtype: str = "auto", generation: GenerationSettings | None = None,
                join: bool = False) -> DistillJob:
    """Validate everything, prepare the data and return the job to train (nothing trained).

    ``join``: a `torchrun` rank other than 0, which validates the same way and then waits for
    rank 0's data instead of preparing its own."""
    check_loss_settings(settings.alpha, settings.temperature, settings.kl)
    _check_numbers(settings, nproc, checkpoint_every, max_minutes, save_dtype)
    from surge.optimize.export import open_source, prepare_out

    source = open_source(teacher, "--teacher")
    plan = parse_student_spec(student, int(source.config["num_hidden_layers"]))
    teacher_vocab = _teacher_vocab(source.path)
    _check_student_vocab(plan, source.config, teacher_vocab)
    device = _pick_device(device)
    job = DistillJob(teacher=str(source.path), student_spec=plan.spec or student, out=str(out),
                     settings=settings, device=device, world=nproc, resume=resume,
                     checkpoint_every=checkpoint_every, max_minutes=max_minutes,
                     progress=progress, save_dtype=save_dtype, teacher_vocab=teacher_vocab)
    data_file = job.state_dir / "data.pt"
    if join:
        _wait_for(data_file)
        return job
    if resume:
        if not data_file.is_file():
            raise FileNotFoundError(f"--resume: {data_file} not found: {out} holds no "
                                    "distillation to resume; start without --resume")
        examples = torch.load(data_file, weights_only=False)
        check_resumable(job, len(examples))
        return job
    if (job.state_dir / "state.pt").is_file():
        raise FileExistsError(f"--out {out!r} holds a distillation checkpoint: pass --resume "
                              "to continue it, or give a new directory")
    if not data:
        raise ValueError("--data is empty: give a text file, a .jsonl of prompts or 'builtin'")
    existed = Path(out).expanduser().exists()
    prepare_out(out, source.path)
    try:
        examples, described = _prepare_data(job, data, generation or GenerationSettings())
    except BaseException:
        if not existed:  # leave no empty --out behind, but never remove the user's own
            _remove_if_empty(Path(out).expanduser())
        raise
    for line in described:
        print(f"data: {line}")
    job.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = data_file.with_name(f".data.pt.tmp-{os.getpid()}")
    torch.save(examples, tmp)
    os.replace(tmp, data_file)  # ranks that wait for it never see half a file
    return job


def _wait_for(path: Path, timeout_s: float = 3600.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not write {path} within {timeout_s:.0f} s")
        time.sleep(1.0)


def distill(job: DistillJob) -> Path:
    """Train (one process, or ``job.world`` spawned ones) and write the student; its path."""
    if job.world == 1:
        train(job)
    else:
        import torch.multiprocessing as mp

        mp.spawn(run_worker, args=(job, _free_port()), nprocs=job.world, join=True)
    return Path(job.out)


def run_under_torchrun(job: DistillJob) -> None:
    """Join the process group `torchrun` described in the environment and train this rank."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world != job.world:
        job = replace(job, world=world)
    backend = "nccl" if job.device == "cuda" else "gloo"
    if job.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend)
    try:
        train(job, rank)
    finally:
        torch.distributed.destroy_process_group()


# -- models -----------------------------------------------------------------------------------

def load_models(job: DistillJob,
                device: torch.device) -> tuple[TrainableDecoder, TrainableDecoder]:
    """The frozen teacher and the student it initialises, both on ``device``."""
    from surge.models.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(job.teacher)
    teacher = TrainableDecoder(checkpoint.read_config(), "teacher")
    teacher.load_tensors(checkpoint.iter_tensors())
    teacher.to(device).eval().requires_grad_(False)
    plan = parse_student_spec(job.student_spec, teacher.config.num_layers)
    student = build_student(plan, teacher, job.teacher_vocab, job.settings.seed).to(device)
    if job.settings.precision == "bf16":
        # Frozen, so no float32 master copy is needed: half the memory, and autocast need not
        # cast its weights on every forward (on CPU that cast costs as much as the GEMM).
        teacher.to(torch.bfloat16)
    return teacher, student.train()


def export_student(job: DistillJob, student: TrainableDecoder) -> Path:
    """Write the student into ``job.out`` as a Hugging Face directory with the teacher's
    tokenizer and chat template."""
    from surge.models.checkpoint import open_checkpoint
    from surge.optimize.export import write_config, write_tensors, write_tokenizer

    out = Path(job.out)
    teacher_hf = open_checkpoint(job.teacher).read_config()
    name = job.save_dtype
    if name == "auto":
        name = str(teacher_hf.get("torch_dtype") or "float32")
        name = name if name in _DTYPES else "float32"
    write_tensors(out, student.checkpoint_tensors(_DTYPES[name]))
    tokens = {k: teacher_hf[k] for k in ("bos_token_id", "eos_token_id") if k in teacher_hf}
    write_config(out, student.hf_config, torch_dtype=name, dtype=name, **tokens)
    write_tokenizer(Path(job.teacher), out)
    return out


# -- checks and data --------------------------------------------------------------------------

def _check_numbers(s: TrainSettings, nproc: int, checkpoint_every: int,
                   max_minutes: float | None, save_dtype: str) -> None:
    positive = {"--steps": s.steps, "--batch-size": s.batch_size,
                "--micro-batch": s.micro_batch, "--checkpoint-every": checkpoint_every,
                "--nproc": nproc}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} {value} is invalid: allowed is 1 or more")
    if s.seq_len < 2:
        raise ValueError(f"--seq-len {s.seq_len} is invalid: allowed is 2 or more")
    if not s.lr > 0:
        raise ValueError(f"--lr {s.lr} is invalid: allowed is a number > 0")
    if s.warmup_steps < 0 or s.weight_decay < 0 or s.grad_clip < 0:
        raise ValueError("--warmup-steps, --weight-decay and --grad-clip must be >= 0")
    if s.precision not in ("bf16", "fp32"):
        raise ValueError(f"--precision {s.precision!r} is invalid: allowed is bf16 or fp32")
    if max_minutes is not None and not max_minutes > 0:
        raise ValueError(f"--max-minutes {max_minutes} is invalid: allowed is a number > 0")
    if save_dtype != "auto" and save_dtype not in _DTYPES:
        raise ValueError(f"--save-dtype {save_dtype!r} is invalid: allowed is auto, "
                         f"{', '.join(_DTYPES)}")
    per_rank, rest = divmod(s.batch_size, nproc)
    if rest or per_rank % s.micro_batch:
        raise ValueError(f"--batch-size {s.batch_size} must split into --nproc {nproc} "
                         f"process(es) x whole micro-batches of --micro-batch {s.micro_batch}")


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} is invalid: allowed is auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here")
    return device


def _teacher_vocab(path: Path) -> dict[str, int]:
    from surge.tokenizer import load_tokenizer

    return load_tokenizer(path).tokenizer.get_vocab(with_added_tokens=True)


def _check_student_vocab(plan: StudentPlan, teacher_hf: dict[str, Any],
                         teacher_vocab: dict[str, int]) -> None:
    """Refuse a student of another vocabulary now, before any weights are loaded."""
    teacher_size = int(teacher_hf["vocab_size"])
    if plan.kind == "preset":
        from surge.testing.make_model import PRESETS

        size, what = PRESETS[plan.preset or ""].vocab_size, f"preset {plan.preset}"
    elif plan.kind == "directory":
        from surge.models.checkpoint import read_config
        from surge.optimize.trainable import decoder_config

        hf = read_config(plan.directory or Path())
        decoder_config(hf, "student")
        size, what = int(hf.get("vocab_size", -1)), f"checkpoint {plan.directory}"
        student_vocab = directory_vocab(plan.directory or Path())
        if student_vocab is not None and student_vocab != teacher_vocab:
            raise ValueError(f"the student ({what}) has another tokenizer than the teacher: a "
                             "student must share the teacher's vocabulary")
    else:
        return
    if size != teacher_size:
        raise ValueError(f"the student ({what}) has a vocabulary of {size} tokens, the teacher "
                         f"{teacher_size}: a student must share the teacher's vocabulary (same "
                         "tokenizer, same size)")


def _prepare_data(job: DistillJob, data: list[str],
                  generation: GenerationSettings) -> tuple[list[Example], list[str]]:
    from surge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(job.teacher)
    return load_examples(data, tokenizer, job.settings.seq_len,
                         _teacher_answerer(job, generation))


def _teacher_answerer(job: DistillJob, generation: GenerationSettings) -> Any:
    """Answers with Surge's offline engine on the teacher (created only if a JSONL needs it)."""

    def answer(prompts: list[list[int]]) -> list[list[int]]:
        from surge import LLM
        from surge.sampling_params import SamplingParams

        context = job.settings.seq_len + generation.max_tokens
        llm = LLM(job.teacher, device=job.device, max_model_len=context, max_num_seqs=32,
                  kv_cache_memory_bytes=512 << 20)
        params = SamplingParams(temperature=generation.temperature,
                                max_tokens=generation.max_tokens, seed=generation.seed)
        outputs = llm.generate(prompts, params, use_tqdm=job.progress)
        answers = [list(out.outputs[0].token_ids) for out in outputs]
        del llm
        return answers

    return answer


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _remove_if_empty(path: Path) -> None:
    """Undo prepare_out when the data fails: leave no empty --out behind."""
    try:
        for child in sorted(path.rglob("*"), reverse=True):
            if child.is_dir():
                child.rmdir()
        path.rmdir()
    except OSError:
        pass
