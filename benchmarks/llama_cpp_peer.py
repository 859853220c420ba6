"""llama.cpp as the peer of bench_quant: the same GGUF at each precision, the same workloads.

llama.cpp is not a dependency: point ``--llama-cpp DIR`` (or ``$SURGE_LLAMA_CPP``) at a
directory holding ``llama-bench``, ``llama-batched-bench`` and ``llama-quantize``, built from
the sources that the ``llama-cpp-python`` sdist vendors:

    pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llcpp
    tar xf /tmp/llcpp/llama_cpp_python-*.tar.gz -C /tmp/llcpp
    cmake -S /tmp/llcpp/llama_cpp_python-*/vendor/llama.cpp -B /tmp/llcpp/build -G Ninja \\
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF
    cmake --build /tmp/llcpp/build -j2 --target llama-bench llama-batched-bench llama-quantize

(on an Intel CPU with AMX add ``-DGGML_NATIVE=OFF`` and the AVX-512 flags, AMX off: its
quantized paths die with an illegal instruction there).

The catalogue file is Q4_1; BF16 and Q8_0 are made from it with ``llama-quantize
--allow-requantize``, so every precision holds the same (Q4_1-rounded) weights, as Surge's
bf16, int8 and int4 do when they load that file.

- W4 single stream: ``llama-bench`` generating ``n`` tokens after a ``prompt``-token context
  (``-d``), tokens/s of generation only (Surge's figure includes its 128-token prefill).
- W1 burst: ``llama-batched-bench`` with 16 parallel sequences of 128 prompt and 64 generated
  tokens: generated tokens over the whole time, prefill included, as Surge's W1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PEER_TYPES", "LlamaCpp", "find_llama_cpp"]

# Surge's mode -> the llama.cpp tensor type it is compared with, precision for precision.
PEER_TYPES = {"none": "BF16", "int8": "Q8_0", "int4": "Q4_1"}
_TOOLS = ("llama-bench", "llama-batched-bench", "llama-quantize")


def find_llama_cpp(directory: str | None) -> LlamaCpp | None:
    """The llama.cpp tools in ``directory`` (else $SURGE_LLAMA_CPP, else PATH), or None."""
    directory = directory or os.environ.get("SURGE_LLAMA_CPP")
    found = {}
    for tool in _TOOLS:
        path = Path(directory) / tool if directory else shutil.which(tool)
        if path is None or not Path(path).is_file():
            return None
        found[tool] = str(path)
    return LlamaCpp(found)


@dataclass
class LlamaCpp:
    tools: dict[str, str]

    def version(self) -> str:
        done = subprocess.run([self.tools["llama-bench"], "--version"], capture_output=True,
                              text=True, timeout=60)
        lines = (done.stdout + done.stderr).strip().splitlines()
        return next((line for line in lines if "version" in line), lines[-1] if lines else "?")

    def gguf_of(self, source: Path, tensor_type: str, work: Path) -> Path:
        """``source`` (Q4_1) as ``tensor_type``, made once into ``work``."""
        if tensor_type == "Q4_1":
            return source
        target = work / f"{source.stem}.{tensor_type}.gguf"
        if not target.exists():
            work.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            subprocess.run([self.tools["llama-quantize"], "--allow-requantize", str(source),
                            str(partial), tensor_type], check=True, capture_output=True,
                           timeout=600)
            partial.rename(target)
        return target

    def single_stream(self, model: Path, prompt: int, generated: int, threads: int,
                      repetitions: int) -> float:
        """Generation tokens/s of one sequence after a ``prompt``-token context, the best of
        ``repetitions`` (as bench_quant takes Surge's best round)."""
        done = subprocess.run(
            [self.tools["llama-bench"], "-m", str(model), "-p", "0", "-n", str(generated),
             "-d", str(prompt), "-t", str(threads), "-r", str(repetitions), "-o", "json"],
            check=True, capture_output=True, text=True, timeout=1200)
        [row] = [r for r in json.loads(done.stdout) if r["n_gen"] == generated]
        return float(max(row.get("samples_ts") or [row["avg_ts"]]))

    def burst(self, model: Path, requests: int, prompt: int, generated: int, threads: int,
              repetitions: int) -> float:
        """Generated tokens/s of ``requests`` sequences decoded together, prefill included,
        the best of ``repetitions``."""
        return max(self._burst_once(model, requests, prompt, generated, threads)
                   for _ in range(repetitions))

    def _burst_once(self, model: Path, requests: int, prompt: int, generated: int,
                    threads: int) -> float:
        context = requests * (prompt + generated) + 64
        done = subprocess.run(
            [self.tools["llama-batched-bench"], "-m", str(model), "-c", str(context),
             "-b", "2048", "-ub", "512", "-npp", str(prompt), "-ntg", str(generated),
             "-npl", str(requests), "-t", str(threads), "--output-format", "jsonl"],
            check=True, capture_output=True, text=True, timeout=1200)
        rows = [json.loads(line) for line in done.stdout.splitlines()
                if line.startswith("{")]
        [row] = [r for r in rows if r.get("pl") == requests]
        return requests * generated / float(row["t"])
