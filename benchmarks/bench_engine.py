"""Surge's engine against Hugging Face on BENCH.md's W1 (burst) and W4 (single stream).

Peers, measured in the same run on the same checkpoint (smollm2-135m shape, random weights):
  (a) the naive server design: a lock around `model.generate`, one thread per request;
  (b) Hugging Face `generate` on one left-padded batch of all prompts.
Each in float32 and bfloat16. Prints output tokens/s, Surge's ratios to each peer, the
achieved memory bandwidth for W4, and the KV-cache bytes that 64 requests of 512 tokens hold.

    python benchmarks/bench_engine.py                 # full run (about 6 minutes on 2 cores)
    python benchmarks/bench_engine.py --skip-lock     # without the slow lock baseline
    python benchmarks/bench_engine.py --device cuda --skip-lock   # on a GPU, both sides
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path

import torch

from surge import LLM, SamplingParams
from surge.engine.kv_cache import BlockManager
from surge.engine.request import Request
from surge.models.layers import RMSNorm
from surge.models.linear import Linear
from surge.testing.make_model import write_checkpoint

W1_REQUESTS, W1_PROMPT, W1_OUTPUT = 16, 128, 64
W4_PROMPT, W4_OUTPUT = 128, 256
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def main() -> None:
    args = parse_args()
    model_dir = ensure_model(args.model, args.preset)
    rng = random.Random(args.seed)
    w1_prompts = [random_prompt(rng, W1_PROMPT) for _ in range(W1_REQUESTS)]
    w4_prompt = random_prompt(rng, W4_PROMPT)
    results: dict[str, dict[str, float]] = {}
    for dtype in args.dtypes:
        results[f"surge {dtype}"] = bench_surge(model_dir, dtype, w1_prompts, w4_prompt,
                                                args.device, args.enforce_eager)
        hf = load_hf(model_dir, dtype, args.device)
        results[f"hf padded batch {dtype}"] = {"w1": bench_hf_batch(hf, w1_prompts)}
        if not args.skip_lock:
            results[f"hf lock+generate {dtype}"] = {
                "w1": bench_hf_lock(hf, w1_prompts), "w4": bench_hf_single(hf, w4_prompt)}
        del hf
    report(results, model_dir, args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint dir (default: write the preset)")
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=list(DTYPES))
    parser.add_argument("--skip-lock", action="store_true",
                        help="skip lock+generate (a) (16 sequential generate calls per dtype)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where Surge and the peers run (default: cpu)")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="Surge without CUDA graphs (decode steps eager)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/bench_engine.json")
    return parser.parse_args()


def ensure_model(model: str | None, preset: str) -> Path:
    if model:
        return Path(model)
    path = Path("models") / preset
    if not (path / "config.json").is_file():
        print(f"writing {preset} checkpoint (random weights) to {path} ...")
        write_checkpoint(preset, path)
    return path


def random_prompt(rng: random.Random, length: int) -> list[int]:
    # Skip the first ids: the make-model tokenizers put special tokens there.
    return [rng.randrange(16, 32000) for _ in range(length)]


# -- Surge -----------------------------------------------------------------------------------

def bench_surge(model_dir: Path, dtype: str, w1_prompts: list[list[int]],
                w4_prompt: list[int], device: str = "cpu", enforce_eager: bool = False
                ) -> dict[str, float]:
    llm = LLM(model_dir, dtype=dtype, device=device, enforce_eager=enforce_eager)
    # Warm-up on other prompts of the same shapes (no prefix-cache hits on the timed run):
    # oneDNN builds its kernels for each new batch size once.
    rng = random.Random(1)
    warmup = [random_prompt(rng, W1_PROMPT) for _ in range(W1_REQUESTS)]
    llm.generate(warmup, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                 use_tqdm=False)
    w1 = timed_tokens(lambda: llm.generate(
        w1_prompts, SamplingParams(max_tokens=W1_OUTPUT, temperature=0, ignore_eos=True),
        use_tqdm=False), W1_REQUESTS * W1_OUTPUT)
    w4 = timed_tokens(lambda: llm.generate(
        [w4_prompt], SamplingParams(max_tokens=W4_OUTPUT, temperature=0, ignore_eos=True),
        use_tqdm=False), W4_OUTPUT)
    loaded = llm.engine.core.loaded
    kv_per_token = loaded.config.kv_bytes_per_token(loaded.dtype.itemsize)
    # Each decode step reads every matrix once (the token embedding only one row of it) plus
    # the sequence's KV at its mean context length.
    step_bytes = matrix_bytes(loaded.model) + kv_per_token * (W4_PROMPT + W4_OUTPUT / 2)
    return {"w1": w1, "w4": w4, "w4_gbps": step_bytes * w4 / 1e9}


def matrix_bytes(model: torch.nn.Module) -> int:
    """Bytes of every linear layer's weight and bias, prepacked or not, and the norms."""
    total = 0
    for module in model.modules():
        if isinstance(module, Linear):
            total += module.weight_bytes()
        elif isinstance(module, torch.nn.Linear | RMSNorm | torch.nn.LayerNorm):
            total += sum(p.nbytes for p in module.parameters(recurse=False))
    return total


def timed_tokens(run, num_tokens: int) -> float:
    start = time.perf_counter()
    run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the last kernels count too
    return num_tokens / (time.perf_counter() - start)


# -- Hugging Face peers ----------------------------------------------------------------------

def load_hf(model_dir: Path, dtype: str, device: str = "cpu"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[dtype])
    return model.to(device).eval()


def hf_generate(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                new_tokens: int) -> torch.Tensor:
    input_ids, attention_mask = input_ids.to(model.device), attention_mask.to(model.device)
    with torch.inference_mode():
        return model.generate(input_ids=input_ids, attention_mask=attention_mask,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=0)


def bench_hf_single(model, prompt: list[int]) -> float:
    ids = torch.tensor([prompt])
    return timed_tokens(lambda: hf_generate(model, ids, torch.ones_like(ids), W4_OUTPUT),
                        W4_OUTPUT)


def bench_hf_batch(model, prompts: list[list[int]]) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return timed_tokens(lambda: hf_generate(model, ids, mask, W1_OUTPUT),
                        len(prompts) * W1_OUTPUT)


def bench_hf_lock(model, prompts: list[list[int]]) -> float:
    """The naive server: one thread per request, a lock around generate."""
    lock = threading.Lock()

    def serve(prompt: list[int]) -> None:
        ids = torch.tensor([prompt])
        with lock:
            hf_generate(model, ids, torch.ones_like(ids), W1_OUTPUT)

    def run() -> None:
        threads = [threading.Thread(target=serve, args=(p,)) for p in prompts]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return timed_tokens(run, len(prompts) * W1_OUTPUT)


# -- KV memory -------------------------------------------------------------------------------

def kv_bytes_for(model_dir: Path, num_requests: int, tokens: int) -> dict[str, float]:
    """Bytes the paged cache holds for these requests, vs one max-length slot per request."""
    config = json.loads((model_dir / "config.json").read_text())
    layers, kv_heads = config["num_hidden_layers"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    per_token = 2 * layers * kv_heads * head_dim * 2  # K and V, bf16
    block_size = 16
    manager = BlockManager(num_requests * tokens // block_size + 1, block_size)
    for i in range(num_requests):
        request = Request(str(i), list(range(i * tokens, (i + 1) * tokens)), SamplingParams())
        assert manager.allocate_slots(request, tokens)
    used = manager.num_blocks - manager.num_free_blocks
    return {"paged_bytes": used * block_size * per_token,
            "max_len_slot_bytes": num_requests * config["max_position_embeddings"] * per_token}


# -- report ----------------------------------------------------------------------------------

def report(results: dict[str, dict[str, float]], model_dir: Path,
           args: argparse.Namespace) -> None:
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{torch.get_num_threads()} threads")
    print(f"\nmodel {model_dir}, {where}, torch {torch.__version__}")
    print(f"{'system':28s} {'W1 out tok/s':>13s} {'W4 tok/s':>10s} {'W4 GB/s':>9s}")
    for name, row in results.items():
        print(f"{name:28s} {row.get('w1', float('nan')):13.1f} {row.get('w4', float('nan')):10.1f}"
              f" {row.get('w4_gbps', float('nan')):9.1f}")
    print("\nratios (Surge / peer, same dtype unless named):")
    for dtype in args.dtypes:
        surge = results[f"surge {dtype}"]
        for peer in (f"hf padded batch {dtype}", f"hf lock+generate {dtype}",
                     "hf padded batch float32"):
            if peer in results:
                line = f"  surge {dtype} vs {peer}: W1 x{surge['w1'] / results[peer]['w1']:.2f}"
                if "w4" in results[peer]:
                    line += f", W4 x{surge['w4'] / results[peer]['w4']:.2f}"
                print(line)
    kv = kv_bytes_for(model_dir, 64, 512)
    print(f"\nKV cache for 64 requests x 512 tokens (bf16): paged {kv['paged_bytes'] / 2**20:.0f} "
          f"MiB vs {kv['max_len_slot_bytes'] / 2**20:.0f} MiB as max-length slots")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "kv": kv,
                               "threads": torch.get_num_threads(), "device": where},
                              indent=2))
    if args.no_plot:
        print(f"wrote {out}")
        return
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(results: dict[str, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, key, title in ((axes[0], "w1", "W1: 16 x (128 in, 64 out), output tok/s"),
                           (axes[1], "w4", "W4: single stream, tok/s")):
        names = [n for n in results if key in results[n]]  # padded batch has no W4
        values = [results[n][key] for n in names]
        ax.barh(names, values, color=["tab:blue" if n.startswith("surge") else "tab:gray"
                                      for n in names])
        ax.set_title(title)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.0f}", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
