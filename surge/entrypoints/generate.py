"""`surge generate`: offline batched generation from the command line."""

from __future__ import annotations

import argparse
import time

from surge.config import EngineConfig
from surge.sampling_params import SamplingParams

__all__ = ["run_generate"]

DEMO_PROMPTS = [
    "Surge serves many users at once by",
    "The quick brown fox",
    "Continuous batching means",
    "Hello, my name is",
]


def run_generate(args: argparse.Namespace) -> int:
    from surge.entrypoints.default_model import default_model
    from surge.entrypoints.llm import LLM

    model = args.model or default_model()[0]
    config = EngineConfig.from_args(args)
    engine_args = {k: v for k, v in vars(config).items() if k != "model"}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.sampling_seed)
    llm = LLM(model, **engine_args)
    prompts = args.prompts or DEMO_PROMPTS
    start = time.perf_counter()
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for prompt, output in zip(prompts, outputs, strict=True):
        completion = output.outputs[0]
        print(f"\n>>> {prompt}\n{completion.text!r}  [{completion.finish_reason}, "
              f"{len(completion.token_ids)} tokens]")
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"\n{len(outputs)} requests, {num_tokens} output tokens in {elapsed:.2f} s "
          f"({num_tokens / elapsed:.1f} tok/s)")
    return 0

