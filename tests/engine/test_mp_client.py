"""The engine core in its own process behind ZMQ: parity with the offline engine, refusals,
aborts that free the KV cache, crash handling with and without restart, clean shutdown.

Run directly for the overhead benchmark (a timing, so not a test: tokens/s of 16 concurrent
requests via MPEngineClient, InprocEngineClient and the offline LLM, same machine, same run):
``python -m tests.engine.test_mp_client smollm2-135m bfloat16`` (default: tiny-llama float32)
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from surge import LLM, SamplingParams
from surge.config import EngineConfig
from surge.engine.client import EngineClient, EngineDeadError, InprocEngineClient
from surge.engine.mp_client import MPEngineClient
from surge.engine.protocol import AddRequest, EngineCoreOutput

T = TypeVar("T")

# A small KV cache: start-up zeroes it, and every test here spawns at least one engine.
CONFIG = EngineConfig(dtype="float32", kv_cache_memory_bytes=32 << 20)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=1500, ignore_eos=True)
# Lengths cover one token, several blocks, and a prompt chunked over steps (budget 512).
PROMPTS = [[5], [5, 6, 7, 8], [100, 200, 300], list(range(40, 90)), list(range(10, 710)),
           [7] * 33, [1999, 3, 1999], list(range(300, 428))]
START_SECONDS = 120.0  # spawning imports torch: slow on a loaded 2-core machine
PROMPT_SECONDS = 5.0  # how soon a dead engine's requests must fail, an abort free blocks


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint("tiny-llama")


@dataclass
class Session:
    """An event loop that outlives one test, so tests can share one engine process."""

    runner: asyncio.Runner
    client: MPEngineClient

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return self.runner.run(asyncio.wait_for(coro, timeout))


@pytest.fixture(scope="module")
def shared(model_dir: Path) -> Iterator[Session]:
    with asyncio.Runner() as runner:
        session = Session(runner, MPEngineClient(CONFIG, str(model_dir)))
        session.run(session.client.start(), START_SECONDS)
        try:
            yield session
        finally:
            session.run(session.client.shutdown())


async def collect(client: EngineClient, request_id: str, prompt: list[int],
                  params: SamplingParams = GREEDY) -> list[int]:
    tokens: list[int] = []
    async for update in client.generate(AddRequest(request_id, prompt, params)):
        tokens.extend(update.new_token_ids)
    return tokens


async def started_client(model_dir: Path, **kwargs: Any) -> MPEngineClient:
    client = MPEngineClient(CONFIG, str(model_dir), **kwargs)
    await asyncio.wait_for(client.start(), START_SECONDS)
    return client


async def first_token_then_wait(client: EngineClient, request_id: str,
                                first: asyncio.Event) -> BaseException | None:
    """Stream a long request; signal at its first token; return how the stream ended."""
    try:
        async for _ in client.generate(AddRequest(request_id, PROMPTS[1], LONG)):
            first.set()
    except BaseException as exc:
        return exc
    return None


async def in_flight(client: EngineClient, count: int
                    ) -> list[asyncio.Task[BaseException | None]]:
    """``count`` long requests, returned once each has produced a token."""
    events = [asyncio.Event() for _ in range(count)]
    tasks = [asyncio.create_task(first_token_then_wait(client, f"long-{i}", event))
             for i, event in enumerate(events)]
    await asyncio.gather(*(event.wait() for event in events))
    return tasks


async def poll(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def child_pids() -> set[int]:
    return {child.pid for child in multiprocessing.active_children() if child.pid is not None}


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has exited; only its parent's wait() is missing


# -- one shared engine process -------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_concurrent_greedy_streams_equal_offline_outputs(model_dir: Path,
                                                         shared: Session) -> None:
    offline = LLM(model_dir, dtype="float32", kv_cache_memory_bytes=CONFIG.kv_cache_memory_bytes
                  ).generate(PROMPTS, GREEDY, use_tqdm=False)

    async def stream_all() -> list[list[list[int]]]:
        async def updates(request_id: str, prompt: list[int]) -> list[list[int]]:
            return [u.new_token_ids async for u in shared.client.generate(
                AddRequest(request_id, prompt, GREEDY))]
        return await asyncio.gather(*(updates(f"parity-{i}", p)
                                      for i, p in enumerate(PROMPTS)))

    streamed = shared.run(stream_all())
    joined = [[token for step in updates for token in step] for updates in streamed]
    assert joined == [o.outputs[0].token_ids for o in offline]
    # Streamed as generated, one token per step, not in one lump at the end.
    assert all(len(u) == GREEDY.max_tokens for u in streamed)


@pytest.mark.timeout(120)
def test_refused_request_raises_value_error_and_others_continue(shared: Session) -> None:
    async def main() -> tuple[str, list[int]]:
        good = asyncio.create_task(collect(shared.client, "good", PROMPTS[1]))
        with pytest.raises(ValueError, match="unknown") as refused:
            await collect(shared.client, "bad", [10**9])
        return str(refused.value), await good

    message, tokens = shared.run(main())
    assert "allowed is [0, 2047]" in message
    assert len(tokens) == GREEDY.max_tokens


@pytest.mark.timeout(120)
def test_a_duplicate_request_id_is_refused_and_the_first_continues(shared: Session) -> None:
    async def main() -> tuple[str, list[int]]:
        first = asyncio.create_task(collect(shared.client, "same", PROMPTS[1]))
        await asyncio.sleep(0)  # the first request's stream is registered
        with pytest.raises(ValueError, match="already in flight") as refused:
            await collect(shared.client, "same", PROMPTS[2])
        return str(refused.value), await first

    message, tokens = shared.run(main())
    assert "request_id='same'" in message and "allowed is an id unique" in message
    assert len(tokens) == GREEDY.max_tokens


@pytest.mark.timeout(120)
def test_sampling_params_are_validated_again_in_the_engine(shared: Session) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4)
    params.temperature = -1.0  # bypasses the constructor's check; the engine's decode catches it
    with pytest.raises(ValueError, match=r"temperature=-1\.0 is invalid"):
        shared.run(collect(shared.client, "mutated", PROMPTS[1], params))
    assert shared.run(collect(shared.client, "after", PROMPTS[1])) != []


@pytest.mark.timeout(120)
def test_leaving_a_stream_early_aborts_it_and_frees_its_kv_blocks(shared: Session) -> None:
    async def main() -> tuple[float, bool, float]:
        stream = cast(AsyncGenerator[EngineCoreOutput, None], shared.client.generate(
            AddRequest("leaver", PROMPTS[3], LONG)))
        stats = shared.client.stats
        async for _ in stream:
            break
        in_use = stats().kv_cache_usage  # the stats that came with the first token
        await stream.aclose()
        freed = await poll(lambda: stats().num_running == 0 and stats().kv_cache_usage == 0.0,
                           PROMPT_SECONDS)
        return in_use, freed, stats().kv_cache_usage

    in_use, freed, usage = shared.run(main())
    assert in_use > 0.0
    assert freed, f"the KV cache still holds {usage:.2%} after the stream was left"


@pytest.mark.timeout(120)
def test_ctrl_c_to_the_process_group_leaves_the_engine_to_the_server(shared: Session) -> None:
    pid = shared.client.engine_pid
    assert pid is not None
    os.kill(pid, signal.SIGINT)
    assert len(shared.run(collect(shared.client, "after-sigint", PROMPTS[2]))) == 12
    assert shared.client.engine_pid == pid and shared.client.is_healthy


@pytest.mark.timeout(120)
def test_sigterm_to_the_process_group_leaves_the_engine_to_the_server(shared: Session) -> None:
    """systemd (and `kill -TERM -- -PGID`) signal the whole group: the engine used to exit at
    once, failing every request the server was draining."""
    pid = shared.client.engine_pid
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    assert len(shared.run(collect(shared.client, "after-sigterm", PROMPTS[2]))) == 12
    assert shared.client.engine_pid == pid and shared.client.is_healthy


# -- engines of their own ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.timeout(300)
def test_killed_engine_fails_in_flight_requests_and_is_restarted(model_dir: Path) -> None:
    async def main() -> None:
        client = await started_client(model_dir, restart=True, max_restarts=1)
        try:
            before = await collect(client, "before", PROMPTS[2])
            tasks = await in_flight(client, 4)
            old_pid = client.engine_pid
            assert old_pid is not None
            os.kill(old_pid, signal.SIGKILL)
            errors = await asyncio.wait_for(asyncio.gather(*tasks), PROMPT_SECONDS)
            assert all(isinstance(e, EngineDeadError) for e in errors), errors
            assert "died (exit code -9, killed by SIGKILL)" in str(errors[0])
            assert not client.is_healthy
            with pytest.raises(EngineDeadError, match="restarting"):
                client.generate(AddRequest("while-restarting", PROMPTS[2], GREEDY))
            assert await poll(lambda: client.is_healthy, START_SECONDS)
            assert client.engine_pid != old_pid and client.num_restarts == 1
            assert await collect(client, "after", PROMPTS[2]) == before
        finally:
            await client.shutdown()

    asyncio.run(main())


@pytest.mark.timeout(300)
def test_shutdown_ends_in_flight_requests_and_leaves_no_child(model_dir: Path) -> None:
    async def main() -> tuple[int, list[BaseException | None]]:
        client = await started_client(model_dir)
        pid = client.engine_pid
        assert pid is not None
        tasks = await in_flight(client, 2)
        await asyncio.wait_for(client.shutdown(), PROMPT_SECONDS)
        return pid, await asyncio.wait_for(asyncio.gather(*tasks), PROMPT_SECONDS)

    pid, errors = asyncio.run(main())
    assert all(isinstance(e, EngineDeadError) and "shut down" in str(e) for e in errors)
    assert process_gone(pid) and pid not in child_pids()


@pytest.mark.timeout(300)
def test_without_restart_a_killed_engine_stays_dead(model_dir: Path) -> None:
    # SIGKILL: SIGTERM is ignored while the server lives (the test above).
    async def main() -> None:
        client = await started_client(model_dir, restart=False)
        try:
            tasks = await in_flight(client, 2)
            assert client.engine_pid is not None
            os.kill(client.engine_pid, signal.SIGKILL)
            assert await asyncio.wait_for(client.wait_dead(), PROMPT_SECONDS) == -9
            errors = await asyncio.wait_for(asyncio.gather(*tasks), PROMPT_SECONDS)
            assert all(isinstance(e, EngineDeadError) for e in errors), errors
            assert client.dead and client.exit_code == -9 and not client.is_healthy
            assert client.why_not_restarted == "restarts are off (--no-engine-restart)"
            with pytest.raises(EngineDeadError, match="will not be restarted"):
                client.generate(AddRequest("too-late", PROMPTS[2], GREEDY))
        finally:
            await client.shutdown()

    asyncio.run(main())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_restarts_are_budgeted_over_a_window_not_over_the_servers_life(
        model_dir: Path) -> None:
    """At most one restart per second here: deaths further apart are each restarted (the
    client used to give up at the second death, however long after the first)."""
    async def kill_and_wait_back(client: MPEngineClient) -> None:
        old_pid = client.engine_pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        assert await poll(lambda: client.is_healthy and client.engine_pid != old_pid,
                          START_SECONDS)

    async def main() -> None:
        client = await started_client(model_dir, max_restarts=1, restart_window=1.0)
        try:
            await kill_and_wait_back(client)
            await asyncio.sleep(1.1)  # the restart budget's window passes
            await kill_and_wait_back(client)
            assert client.num_restarts == 2 and not client.dead
        finally:
            await client.shutdown()

    asyncio.run(main())


def test_a_bad_restart_window_is_refused() -> None:
    with pytest.raises(ValueError, match="restart_window=0 is invalid"):
        MPEngineClient(CONFIG, "unused", restart_window=0)


@pytest.mark.timeout(300)
def test_bad_model_path_makes_start_raise_with_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    client = MPEngineClient(CONFIG, str(missing))
    children_before = child_pids()
    with pytest.raises(RuntimeError, match="could not start the engine") as failed:
        asyncio.run(asyncio.wait_for(client.start(), START_SECONDS))
    assert str(missing) in str(failed.value) and "config.json" in str(failed.value)
    assert not client.is_ready and child_pids() == children_before


@pytest.mark.timeout(120)
def test_shutdown_while_starting_stops_the_half_started_engine(model_dir: Path) -> None:
    children_before = child_pids()

    async def main() -> BaseException | None:
        client = MPEngineClient(CONFIG, str(model_dir))
        starting = asyncio.create_task(client.start())
        assert await poll(lambda: bool(child_pids() - children_before), 10.0)  # spawned
        await asyncio.wait_for(client.shutdown(), PROMPT_SECONDS)
        return (await asyncio.gather(starting, return_exceptions=True))[0]

    outcome = asyncio.run(main())
    assert isinstance(outcome, RuntimeError) and "shut down while" in str(outcome)
    assert child_pids() == children_before


_ORPHANING_PARENT = textwrap.dedent("""
    import asyncio, os, sys
    from surge.config import EngineConfig
    from surge.engine.mp_client import MPEngineClient

    async def main():
        client = MPEngineClient(EngineConfig(kv_cache_memory_bytes=8 << 20), sys.argv[1])
        await client.start()
        print(client.engine_pid, client._folder, flush=True)
        os._exit(0)  # die without shutting anything down

    if __name__ == "__main__":
        asyncio.run(main())
""")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_exits_when_the_server_process_dies(model_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "orphaning_parent.py"
    script.write_text(_ORPHANING_PARENT)
    # Read only the first line: the engine inherits the pipe and holds it open until it exits.
    with subprocess.Popen([sys.executable, str(script), str(model_dir)],
                          stdout=subprocess.PIPE, text=True) as parent:
        assert parent.stdout is not None
        pid, folder = parent.stdout.readline().split()
        assert parent.wait(timeout=START_SECONDS) == 0
        assert asyncio.run(poll(lambda: process_gone(int(pid)), 10.0)), \
            "the orphaned engine process is still running"
    assert not Path(folder).exists(), "the orphaned engine left its socket folder behind"


# -- overhead benchmark --------------------------------------------------------------------------

# The machine is shared and noisy: the three ways take turns, each in a fresh process (two
# torch users in one process slow each other down), and each keeps its best burst.
BENCH_ROUNDS = 3
BENCH_BURSTS = 3
WAYS = ("offline LLM", "MPEngineClient", "InprocEngineClient")


def measure_way(way: str, model_dir: str, engine_args: dict[str, Any], num_requests: int = 16,
                prompt_len: int = 128, output_len: int = 64) -> float:
    """Best output tokens/s of a burst (BENCH.md's W1 shape) through one way to the engine."""
    prompts = [[(31 * i + 7 * j) % 1000 + 10 for j in range(prompt_len)]
               for i in range(num_requests)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    return asyncio.run(_best_burst(way, model_dir, engine_args, prompts, params))


async def _best_burst(way: str, model_dir: str, engine_args: dict[str, Any],
                      prompts: list[list[int]], params: SamplingParams) -> float:
    client: EngineClient | None = None
    if way == "offline LLM":
        llm = LLM(model_dir, **engine_args)
        burst = partial(_offline_burst, llm, prompts, params)
    else:
        kind = MPEngineClient if way == "MPEngineClient" else InprocEngineClient
        client = kind(EngineConfig(**engine_args), model_dir)
        await client.start()
        burst = partial(_client_burst, client, prompts, params)
    try:
        await burst()  # warm-up
        best = 0.0
        for _ in range(BENCH_BURSTS):
            start = time.perf_counter()
            tokens = await burst()
            best = max(best, tokens / (time.perf_counter() - start))
        return best
    finally:
        if client is not None:
            await client.shutdown()


async def _offline_burst(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> int:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outputs)


async def _client_burst(client: EngineClient, prompts: list[list[int]],
                        params: SamplingParams) -> int:
    outputs = await asyncio.gather(*(collect(client, uuid.uuid4().hex, p, params)
                                     for p in prompts))
    return sum(map(len, outputs))


def _report(title: str, results: dict[str, float]) -> str:
    base = results["offline LLM"]
    return "\n".join([f"W1 burst (16 x 128 -> 64 tokens), {title}, best of "
                      f"{BENCH_ROUNDS * BENCH_BURSTS}:"] + [
        f"  {name:<20} {value:8.1f} tok/s  ({value / base:.0%} of offline)"
        for name, value in results.items()])


def _main(argv: list[str]) -> None:
    import tempfile

    from surge.testing.make_model import write_checkpoint

    if argv[:1] == ["--way"]:  # one measurement, in this fresh process
        way, model, dtype = argv[1:4]
        print(measure_way(way, model, {"dtype": dtype, "kv_cache_memory_bytes": 256 << 20}))
        return
    preset, dtype = (argv + ["tiny-llama", "float32"][len(argv):])[:2]
    best = dict.fromkeys(WAYS, 0.0)
    with tempfile.TemporaryDirectory() as folder:
        model = str(write_checkpoint(preset, Path(folder) / preset, seed=0))
        for _ in range(BENCH_ROUNDS):
            for way in WAYS:
                run = subprocess.run([sys.executable, "-m", __spec__.name, "--way", way, model,
                                      dtype], capture_output=True, text=True, check=True)
                best[way] = max(best[way], float(run.stdout.split()[-1]))
    print(_report(f"{preset} {dtype}", best))


if __name__ == "__main__":
    _main(sys.argv[1:])
