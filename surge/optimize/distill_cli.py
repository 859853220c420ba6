"""`surge optimize distill`: its flags (torch-free, for a fast `surge --help`) and its run.

Registered by `surge.optimize.cli`. Examples::

    surge optimize distill --teacher smollm2-135m-instruct --student layers=15 \\
        --data prompts.jsonl --data builtin --max-minutes 20 --out ./smol-15l
    surge optimize distill --teacher ./ckpt --student drop:every2 --nproc 2 --out ./half
    torchrun --nproc-per-node 2 -m surge.optimize.distill_cli --teacher ./ckpt ...
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_arguments", "main", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from surge.optimize.gate import add_gate_args

    p.add_argument("--teacher", required=True,
                   help="checkpoint directory, .gguf file or catalogue name (a float causal LM "
                        "of the Llama family)")
    p.add_argument("--student", required=True, metavar="SPEC",
                   help="layers=N (N evenly spaced teacher layers), drop:everyK, keep:0,2,5, "
                        "each optionally with ,mlp=F (narrowed MLPs); mlp=F; preset:NAME "
                        "(random weights); or a checkpoint directory. Derived students start "
                        "from the teacher's weights; all must share its vocabulary")
    p.add_argument("--out", required=True, help="output directory (new or empty; or the one "
                   "to --resume)")
    p.add_argument("--data", action="append", default=None, metavar="SOURCE",
                   help="training data, repeatable: a UTF-8 text file, a .jsonl of prompts "
                        "the teacher answers ({\"prompt\": ...} or {\"messages\": [...]}; a "
                        "\"response\" is used as given), or 'builtin' (the built-in corpus's "
                        "training split; the default)")
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    t.add_argument("--batch-size", type=int, default=8,
                   help="sequences per optimizer step, over all processes (default 8)")
    t.add_argument("--micro-batch", type=int, default=4,
                   help="sequences per forward pass; the rest is gradient accumulation "
                        "(default 4)")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default 256)")
    t.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (default 3e-4)")
    t.add_argument("--warmup-steps", type=int, default=10,
                   help="linear warmup, then a cosine to lr/10 (default 10)")
    t.add_argument("--weight-decay", type=float, default=0.01, help="AdamW (default 0.01)")
    t.add_argument("--grad-clip", type=float, default=1.0,
                   help="gradient norm clip, 0 for none (default 1.0)")
    t.add_argument("--alpha", type=float, default=0.5,
                   help="loss = alpha x CE + (1 - alpha) x T^2 x KL, alpha in [0, 1] "
                        "(default 0.5)")
    t.add_argument("--temperature", type=float, default=2.0,
                   help="softmax temperature T of the KL term, > 0 (default 2.0)")
    t.add_argument("--kl", default="forward", choices=("forward", "reverse", "jsd"),
                   help="divergence: forward KL(teacher||student), reverse, or Jensen-Shannon "
                        "(default forward)")
    t.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                   help="autocast of the forward passes; weights and AdamW stay float32 "
                        "(default bf16)")
    t.add_argument("--seed", type=int, default=0, help="data order and preset weights (default 0)")
    t.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes (gloo on CPU, NCCL on CUDA); the result equals "
                        "one process with the same --batch-size (default 1)")
    t.add_argument("--checkpoint-every", type=int, default=50,
                   help="save the training state every N steps (default 50)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out at its last checkpoint")
    t.add_argument("--max-minutes", type=float, default=None,
                   help="stop training after this long (the cosine is fitted to it)")
    t.add_argument("--save-dtype", default="auto",
                   help="dtype of the written student: auto (the teacher's), bfloat16, float16 "
                        "or float32")
    g = p.add_argument_group("teacher answers (for .jsonl prompts)")
    g.add_argument("--gen-max-tokens", type=int, default=256,
                   help="longest answer, in tokens (default 256)")
    g.add_argument("--gen-temperature", type=float, default=0.0,
                   help="sampling temperature of the answers (default 0: greedy)")
    add_gate_args(p)


def run(args: argparse.Namespace) -> int:
    from surge.optimize.distill import GenerationSettings, distill
    from surge.optimize.distill_train import TrainSettings
    from surge.optimize.gate import run_gate, settings_from_args

    gate = settings_from_args(args, dtype="bfloat16")
    settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, micro_batch=args.micro_batch,
        seq_len=args.seq_len, lr=args.lr, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, alpha=args.alpha,
        temperature=args.temperature, kl=args.kl, precision=args.precision, seed=args.seed)
    torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ.get("RANK", 0))
    nproc = int(os.environ["WORLD_SIZE"]) if torchrun else args.nproc
    if torchrun and args.nproc != 1:
        raise ValueError("--nproc is for a plain launch; under torchrun the ranks are torchrun's")
    job = _prepare(args, settings, nproc, torchrun, rank,
                   GenerationSettings(args.gen_max_tokens, args.gen_temperature, args.seed))
    if torchrun:
        from surge.optimize.distill import run_under_torchrun

        run_under_torchrun(job)
        if rank != 0:
            return 0
    else:
        distill(job)
    print(f"wrote the distilled student to {args.out}")
    return run_gate(original=args.teacher, result=args.out, settings=gate, label="distilled")


def _prepare(args: argparse.Namespace, settings: object, nproc: int, torchrun: bool,
             rank: int, generation: object) -> object:
    """Under torchrun rank 0 prepares the data; the other ranks check and wait for it."""
    from surge.optimize.distill import prepare_job

    return prepare_job(args.teacher, args.student, args.out, args.data or ["builtin"], settings,
                       nproc=nproc, device=args.device, resume=args.resume,
                       checkpoint_every=args.checkpoint_every, max_minutes=args.max_minutes,
                       progress=args.progress, save_dtype=args.save_dtype,
                       generation=generation, join=torchrun and rank != 0)


def main(argv: list[str] | None = None) -> int:
    """``python -m surge.optimize.distill_cli`` (what `torchrun -m` runs)."""
    parser = argparse.ArgumentParser(prog="surge optimize distill")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"surge: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
