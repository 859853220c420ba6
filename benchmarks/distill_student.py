"""The README's distilled student: SmolLM2-135M-Instruct with half its layers, trained for a
bounded time on the teacher's own answers plus real text, then gated against the teacher.

    python benchmarks/distill_student.py --out results/smollm2-distilled      # ~20 min + gate
    python benchmarks/distill_student.py --out /tmp/smol-quick --quick        # ~1 min + gate

What it runs (printed first, so it can be rerun by hand):

1. writes ``distill_prompts.jsonl`` beside --out: instruction prompts built from templates x
   subjects, checked to share no prompt with `surge eval`'s built-in suite (the gate's
   agreement is measured on that suite);
2. writes ``distill_text.txt`` beside --out: the first part of the built-in corpus's *training*
   split (the gate's perplexity is measured on its held-out test split);
3. ``surge optimize distill --teacher smollm2-135m-instruct --student layers=15 --data
   distill_prompts.jsonl --data distill_text.txt --max-minutes M ...``: the teacher answers the
   prompts with Surge's offline engine (sequence-level distillation), the student (15 of the
   30 layers, initialised from the teacher's) trains on those answers and the text with
   0.5 x CE + 0.5 x T^2 x KL, and the gate prints the table against the teacher and appends the
   variant to ``optimize-variants.jsonl`` beside --out (bench_optimize's Pareto plot reads it).

The numbers are whatever a 2-core CPU reaches in that time; they are not tuned per machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from pathlib import Path

SUBJECTS = (
    "the moon", "rain", "bread", "a bicycle", "the internet", "honey bees", "volcanoes",
    "the human heart", "libraries", "electric cars", "the ocean tides", "coffee", "snow",
    "a compass", "the piano", "forests", "the alphabet", "gravity", "recycling", "a rainbow",
    "deserts", "the printing press", "vaccines", "clouds", "trains", "chess", "sleep",
    "the stock market", "penguins", "solar panels", "a thermometer", "friendship",
    "photosynthesis in trees", "the Roman Empire", "earthquakes", "email", "tea",
    "a lighthouse", "the seasons", "soccer",
)
TEMPLATES = (
    "Explain {s} to a ten-year-old in two sentences.",
    "Give three short facts about {s}.",
    "Write one sentence describing {s}.",
    "Why is {s} important? Answer briefly.",
    "What is a common misconception about {s}?",
    "Describe how {s} works in simple terms.",
)
PLAIN = (
    "Write a polite email asking a colleague to reschedule a meeting.",
    "List three tips for studying effectively.",
    "Suggest a name for a small bakery.",
    "Summarize the benefits of regular exercise in one sentence.",
    "Translate 'thank you very much' into French.",
    "Write a haiku about autumn leaves.",
    "What should I pack for a weekend camping trip?",
    "Give me a simple recipe for scrambled eggs.",
    "How do I make my password more secure?",
    "Explain the difference between weather and climate.",
    "What is a good way to start learning to program?",
    "Write a short thank-you note to a teacher.",
    "How many minutes are there in two hours?",
    "What is 7 plus 8?",
    "Name three primary colors.",
    "Complete the sentence: The early bird catches the",
)


def training_prompts(count: int) -> list[str]:
    """``count`` prompts: the plain ones, then templates x subjects interleaved."""
    pairs = itertools.product(SUBJECTS, TEMPLATES)
    built = (template.format(s=subject) for subject, template in pairs)
    prompts = list(itertools.islice(itertools.chain(PLAIN, built), count))
    if len(prompts) < count:
        raise SystemExit(f"--prompts {count}: only {len(prompts)} distinct prompts available")
    return prompts


def check_disjoint_from_eval(prompts: list[str]) -> None:
    from surge.eval.prompts import load_suite

    _, cases = load_suite(None)
    evaluated = {case.prompt.strip().lower() for case in cases}
    shared = [p for p in prompts if p.strip().lower() in evaluated]
    if shared:
        raise SystemExit(f"training prompts overlap the evaluation suite: {shared}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="student directory (new)")
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--student", default="layers=15")
    p.add_argument("--train-minutes", type=float, default=None,
                   help="training time bound (default 20; 1 with --quick)")
    p.add_argument("--prompts", type=int, default=None, help="default 192 (16 with --quick)")
    p.add_argument("--gen-max-tokens", type=int, default=None,
                   help="longest teacher answer (default 160; 48 with --quick)")
    p.add_argument("--text-chars", type=int, default=None,
                   help="characters of the built-in training split used as real text "
                        "(default 150000; 20000 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="the 1-minute proof: 16 prompts, short answers, 1 minute of training, "
                        "the gate's quick evaluation")
    p.add_argument("--no-gate", action="store_true",
                   help="write the student only (a caller such as bench_optimize.py gates it)")
    p.add_argument("--nproc", type=int, default=1)
    p.add_argument("extra", nargs="*", help="more `surge optimize distill` flags (after --)")
    args = p.parse_args()
    defaults = {"train_minutes": 20.0, "prompts": 192, "gen_max_tokens": 160,
                "text_chars": 150_000}
    if args.quick:
        defaults = {"train_minutes": 1.0, "prompts": 16, "gen_max_tokens": 48,
                    "text_chars": 20_000}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    out = Path(args.out).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts = training_prompts(args.prompts)
    check_disjoint_from_eval(prompts)
    prompt_file = out.parent / f"{out.name}-prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"prompt": text}) + "\n" for text in prompts),
                           encoding="utf-8")
    from surge.eval.corpus import builtin_corpus

    text_file = out.parent / f"{out.name}-text.txt"
    text_file.write_text(builtin_corpus("train").text[:args.text_chars], encoding="utf-8")
    command = [
        "optimize", "distill", "--teacher", args.teacher, "--student", args.student,
        "--out", str(out), "--data", str(prompt_file), "--data", str(text_file),
        "--seq-len", "128" if args.quick else "256", "--batch-size", "8", "--micro-batch", "4",
        "--steps", "2000", "--max-minutes", str(args.train_minutes), "--lr", "5e-4",
        "--warmup-steps", "2" if args.quick else "5", "--alpha", "0.5", "--temperature", "2.0",
        "--checkpoint-every", "25", "--gen-max-tokens", str(args.gen_max_tokens),
        "--nproc", str(args.nproc), *(["--quick"] if args.quick else []),
        *(["--no-eval"] if args.no_gate else []), *args.extra]
    print("surge " + shlex.join(command), flush=True)
    from surge.cli import main as surge_main

    began = time.perf_counter()
    code = surge_main(command)
    print(f"distill_student: exit {code} after {time.perf_counter() - began:.0f} s "
          f"(training bounded to {args.train_minutes:g} min)")
    return code


if __name__ == "__main__":
    sys.exit(main())
