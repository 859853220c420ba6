"""`MPEngineClient`: the engine core in a child process, reached over ZMQ.

The client binds two ipc sockets in a private temp folder and spawns the engine process
(``surge.engine.process``), which loads the model and says READY. From then on:

- ``generate`` (``EngineClient``'s) sends an ``Add`` at once (no await, so adds and aborts
  keep their order) and returns an iterator over the request's own stream;
- one receive task decodes each step's message and hands its outputs to those streams;
- a supervisor task waits on the process's sentinel. When the process dies it fails every
  in-flight request with ``EngineDeadError`` at once and, if allowed, starts a new engine.

Restarts have a budget over a time window: at most ``max_restarts`` within any
``restart_window`` seconds (3 in 600 s by default). Deaths further apart are each restarted,
however many there are over the server's life; an engine that keeps dying (a bad GPU, a
model that crashes on load) is given up, and the server exits non-zero for its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, TypeVar

import msgspec
import zmq
import zmq.asyncio

from surge.config import EngineConfig
from surge.engine.client import EngineClient, EngineDeadError, EngineInfo
from surge.engine.process import (
    Abort,
    Add,
    EngineFailed,
    EngineInput,
    EngineMessage,
    Profile,
    Profiled,
    Ready,
    Shutdown,
    StartupFailed,
    StepOutputs,
    Weights,
    run_engine_process,
)
from surge.engine.protocol import (
    AbortRequests,
    AddRequest,
    EngineStats,
    SetTenantWeights,
    StartProfile,
)
from surge.procs import describe_exit, uses_json_logs

__all__ = ["EngineStartError", "MPEngineClient"]

logger = logging.getLogger(__name__)

# After a graceful Shutdown message, how long the engine gets before SIGTERM, then SIGKILL.
SHUTDOWN_TIMEOUT_SECONDS = 10.0
KILL_TIMEOUT_SECONDS = 2.0
# A process that just exited may still have its last message in flight on the socket.
LAST_WORDS_MILLISECONDS = 50
# Unix socket paths are limited to 107 bytes.
_MAX_IPC_PATH = 100

SocketT = TypeVar("SocketT", bound=zmq.Socket)

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(EngineMessage)


class EngineStartError(RuntimeError):
    """The engine process could not load the model; ``exit_code`` is the child's."""

    def __init__(self, message: str, exit_code: int | None):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class _Contexts:
    """A plain context for the input PUSH (its sends never wait) and an asyncio one for the
    output PULL; one per client, destroyed by ``shutdown``."""

    sync: zmq.Context = field(default_factory=zmq.Context)
    async_: zmq.asyncio.Context = field(default_factory=zmq.asyncio.Context)

    def destroy(self) -> None:
        self.sync.destroy(linger=0)
        self.async_.destroy(linger=0)


@dataclass(eq=False)
class _EngineProcess:
    """One incarnation of the engine process and the two sockets that talk to it."""

    process: BaseProcess
    inputs: zmq.Socket  # a plain PUSH: sends never wait, even on the event loop
    outputs: zmq.asyncio.Socket
    exited: asyncio.Future[None]
    receiver: asyncio.Task[None] | None = None
    pending_receive: asyncio.Future[bytes] | None = None
    failure: str | None = None  # the engine's last words when it crashed, if it sent any

    @classmethod
    def spawn(cls, contexts: _Contexts, folder: str, generation: int,
              config: EngineConfig, model_dir: str) -> _EngineProcess:
        input_address = _address(folder, f"input-{generation}")
        output_address = _address(folder, f"output-{generation}")
        inputs = _bound(contexts.sync.socket(zmq.PUSH), input_address)
        outputs = _bound(contexts.async_.socket(zmq.PULL), output_address)
        process = multiprocessing.get_context("spawn").Process(
            target=run_engine_process, name=f"surge-engine-{generation}", daemon=True,
            args=(_ENCODER.encode(config), model_dir, input_address, output_address,
                  os.getpid(), logging.getLogger("surge").getEffectiveLevel(),
                  uses_json_logs()))
        try:
            process.start()
        except BaseException:
            inputs.close(linger=0)
            outputs.close(linger=0)
            raise
        loop = asyncio.get_running_loop()
        engine = cls(process, inputs, outputs, loop.create_future())
        loop.add_reader(process.sentinel, engine._on_sentinel)
        return engine

    def _on_sentinel(self) -> None:
        asyncio.get_running_loop().remove_reader(self.process.sentinel)
        if not self.exited.done():
            self.exited.set_result(None)

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def exit_code(self) -> int | None:
        if self.exited.done():
            self.process.join(timeout=1.0)  # the sentinel fired: reaping is immediate
        return self.process.exitcode

    def send(self, message: EngineInput) -> None:
        """Raises zmq.ZMQError (zmq.Again) when no engine is connected."""
        self.inputs.send(_ENCODER.encode(message), zmq.NOBLOCK)

    async def first_message(self) -> EngineMessage | None:
        """READY or STARTUP_FAILED; None if the process died without a word."""
        receive = asyncio.ensure_future(self.outputs.recv())
        try:
            either: set[asyncio.Future[Any]] = {receive, self.exited}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                await asyncio.wait({receive}, timeout=LAST_WORDS_MILLISECONDS / 1000)
            return _DECODER.decode(receive.result()) if receive.done() else None
        finally:
            receive.cancel()

    async def last_messages(self) -> list[bytes]:
        """Stop the receive task and collect what the dead process sent before it died."""
        messages = []
        pending = self.pending_receive
        if self.receiver is not None:
            self.receiver.cancel()
        # The receive task had not yet run after its receive completed: that message is ours.
        if pending is not None and pending.done() and not pending.cancelled() \
                and pending.exception() is None:
            messages.append(pending.result())
        while await self.outputs.poll(timeout=LAST_WORDS_MILLISECONDS):
            messages.append(await self.outputs.recv())
        return messages

    async def wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Ask the engine to exit; terminate, then kill, if it does not."""
        with contextlib.suppress(zmq.ZMQError):
            self.send(Shutdown())
        if await self.wait_exit(SHUTDOWN_TIMEOUT_SECONDS):
            return
        # The engine ignores SIGTERM while this process lives (it reaches the whole process
        # group when the server is told to stop): SIGKILL is the way to stop it from here.
        logger.warning("the engine did not exit within %.0f s: killing it",
                       SHUTDOWN_TIMEOUT_SECONDS)
        self.process.kill()
        await self.wait_exit(KILL_TIMEOUT_SECONDS)

    def close(self) -> None:
        """Release sockets and the process handle (the process must have exited)."""
        if self.receiver is not None:
            self.receiver.cancel()
        with contextlib.suppress(ValueError):  # the process handle is already closed
            asyncio.get_running_loop().remove_reader(self.process.sentinel)
            if self.process.is_alive():
                self.process.kill()
            self.process.join(timeout=KILL_TIMEOUT_SECONDS)
            self.process.close()
        self.inputs.close(linger=0)
        self.outputs.close(linger=0)


class MPEngineClient(EngineClient):
    """The engine core in a child process; restarts it if it dies (at most ``max_restarts``
    times within any ``restart_window`` seconds).

    Beyond ``EngineClient``: ``dead`` and ``exit_code`` say that the engine is gone for good
    (``restart=False`` or restarts exhausted), so a server can exit non-zero;
    ``wait_dead()`` waits for that; ``engine_pid`` and ``num_restarts`` are for operators.
    """

    def __init__(self, config: EngineConfig, model_dir: str, *, restart: bool = True,
                 max_restarts: int = 3, restart_window: float = 600.0):
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) \
                or max_restarts < 0:
            raise ValueError(f"max_restarts={max_restarts!r} is invalid: allowed is an "
                             "integer >= 0")
        if not restart_window > 0:
            raise ValueError(f"restart_window={restart_window!r} is invalid: allowed is a "
                             "number of seconds > 0")
        self.restart_window = restart_window
        self._restart_times: deque[float] = deque()  # monotonic times of recent restarts
        super().__init__()
        self.config, self.model_dir = config, str(model_dir)
        self.restart, self.max_restarts = restart, max_restarts
        self.num_restarts = 0
        self._info: EngineInfo | None = None
        self._engine: _EngineProcess | None = None
        self._starting: asyncio.Future[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._healthy = False
        self._stopping = False
        self._exit_code: int | None = None
        self._dead = asyncio.Event()
        self._generation = 0
        self._contexts: _Contexts | None = None
        self._folder: str | None = None

    # -- EngineClient ------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the engine and wait until it has loaded the model.

        Raises ``EngineStartError`` (a RuntimeError) with the child's error message when the
        model cannot be loaded.
        """
        if self._contexts is not None or self._stopping:
            raise RuntimeError("start() was already called on this client, or shutdown()")
        self._contexts = _Contexts()
        self._folder = _private_folder()
        self._starting = asyncio.ensure_future(self._launch())  # shutdown() may cancel it
        try:
            await self._starting
        except asyncio.CancelledError:
            self._close_transport()
            caller = asyncio.current_task()
            if self._stopping and caller is not None and not caller.cancelling():
                raise EngineStartError("the client was shut down while the engine was "
                                       "starting", None) from None
            raise
        except BaseException:
            self._close_transport()
            raise
        finally:
            self._starting = None

    @property
    def is_healthy(self) -> bool:
        return self._healthy

    async def abort(self, request_ids: list[str]) -> None:
        # While the engine is down its requests were already failed: nothing to abort.
        if self._engine is not None and self._healthy:
            with contextlib.suppress(zmq.ZMQError):
                self._engine.send(Abort(AbortRequests(list(request_ids))))

    async def shutdown(self) -> None:
        """Tell the engine to exit and wait for it (then terminate, then kill); idempotent.

        Requests still in flight end with ``EngineDeadError``.
        """
        self._stopping, self._healthy = True, False
        # A launch in progress (start, or a restart) kills its half-started engine.
        for task in (self._starting, self._supervisor):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._supervisor = None
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.stop()
            engine.close()
        self._fail_all(EngineDeadError("the engine was shut down before the request "
                                       "completed"))
        self._close_transport()

    # -- transport ---------------------------------------------------------------------------

    def _send_add(self, request: AddRequest) -> None:
        if self._engine is None:
            raise EngineDeadError(self._unavailable_reason())
        try:
            self._engine.send(Add(request))
        except zmq.ZMQError as exc:
            raise EngineDeadError(f"the engine is unreachable ({exc}); the request was not "
                                  "sent") from exc

    def _send_weights(self, command: SetTenantWeights) -> None:
        # An engine restarted later starts with them (the caller's config stays as it was).
        self.config = dataclasses.replace(self.config, tenant_weights=command.weights)
        if self._engine is not None and self._healthy:
            with contextlib.suppress(zmq.ZMQError):
                self._engine.send(Weights(command))

    def _send_profile(self, command: StartProfile) -> None:
        if self._engine is None:
            raise EngineDeadError(self._unavailable_reason())
        try:
            self._engine.send(Profile(command))
        except zmq.ZMQError as exc:
            raise EngineDeadError(f"the engine is unreachable ({exc})") from exc

    # -- beyond the interface ----------------------------------------------------------------

    @property
    def dead(self) -> bool:
        """The engine is gone and will not be restarted."""
        return self._dead.is_set()

    @property
    def exit_code(self) -> int | None:
        """The dead engine's exit code (negative: killed by that signal); None if not dead."""
        return self._exit_code

    async def wait_dead(self) -> int | None:
        """Wait until the engine is gone for good; returns its exit code."""
        await self._dead.wait()
        return self._exit_code

    @property
    def engine_pid(self) -> int | None:
        return self._engine.pid if self._engine is not None else None

    # -- engine lifecycle --------------------------------------------------------------------

    async def _launch(self) -> None:
        assert self._contexts is not None and self._folder is not None
        self._generation += 1
        engine = _EngineProcess.spawn(self._contexts, self._folder, self._generation,
                                      self.config, self.model_dir)
        try:
            first = await engine.first_message()
            if not isinstance(first, Ready):
                raise await self._startup_error(engine, first)
        except BaseException:
            if engine.process.is_alive():
                engine.process.kill()
                await engine.wait_exit(KILL_TIMEOUT_SECONDS)
            engine.close()
            raise
        self._info, self._stats = first.info, first.stats
        self._engine = engine
        engine.receiver = _task(self._receive(engine), "receive")
        self._supervisor = _task(self._supervise(engine), "supervise")
        self._healthy = True
        logger.info("engine process %d is ready (%s)", engine.pid, self.model_dir)

    async def _startup_error(self, engine: _EngineProcess,
                             first: EngineMessage | None) -> EngineStartError:
        await engine.wait_exit(KILL_TIMEOUT_SECONDS)  # it exits right after saying why
        code = engine.exit_code
        if isinstance(first, StartupFailed | EngineFailed):
            reason = first.error
        else:
            reason = (f"the engine process exited ({describe_exit(code)}) before it was "
                      "ready; see its log above")
        return EngineStartError(f"could not start the engine for {self.model_dir}: {reason}",
                                code)

    async def _receive(self, engine: _EngineProcess) -> None:
        while True:
            engine.pending_receive = asyncio.ensure_future(engine.outputs.recv())
            data = await engine.pending_receive
            try:
                self._dispatch(engine, data)
            except Exception:  # one bad message must not stall every stream
                logger.exception("dropped an engine message that could not be dispatched")

    def _dispatch(self, engine: _EngineProcess, data: bytes) -> None:
        message = _DECODER.decode(data)
        if isinstance(message, StepOutputs):
            self._stats = message.stats
            self._deliver(message.outputs)
        elif isinstance(message, EngineFailed):
            engine.failure = message.error
        elif isinstance(message, Profiled):
            self._profiled(message.result)

    async def _supervise(self, engine: _EngineProcess) -> None:
        await asyncio.shield(engine.exited)  # shutdown cancels us; the future must survive
        self._healthy = False
        for data in await engine.last_messages():
            self._dispatch(engine, data)
        code = engine.exit_code
        self._engine = None
        engine.close()
        self._stats = EngineStats()  # nothing runs now; counters restart with the new engine
        cause = f"the engine process died ({describe_exit(code)})"
        reason = f" (engine error: {engine.failure})" if engine.failure else ""
        logger.error("%s%s", cause, reason)
        self._fail_all(EngineDeadError(f"{cause}; the request was not completed{reason}"))
        await self._restart_or_die(code)

    async def _restart_or_die(self, code: int | None) -> None:
        while self.restart and not self._stopping and self._restart_allowed():
            self.num_restarts += 1
            self._restart_times.append(time.monotonic())
            logger.warning("restarting the engine (restart %d; %d of at most %d within %g s)",
                           self.num_restarts, len(self._restart_times), self.max_restarts,
                           self.restart_window)
            try:
                await self._launch()
                return
            except EngineStartError as exc:
                logger.error("%s", exc)
                code = exc.exit_code
        self._exit_code = code
        self._dead.set()
        logger.error("the engine is dead (%s) and will not be restarted", describe_exit(code))

    def _restart_allowed(self) -> bool:
        """Fewer than ``max_restarts`` restarts within the last ``restart_window`` seconds."""
        since = time.monotonic() - self.restart_window
        while self._restart_times and self._restart_times[0] < since:
            self._restart_times.popleft()
        return len(self._restart_times) < self.max_restarts

    @property
    def why_not_restarted(self) -> str:
        """Why a dead engine stays dead, for the server's last words."""
        if not self.restart:
            return "restarts are off (--no-engine-restart)"
        if self._stopping:
            return "the server is stopping"
        return (f"it was restarted {len(self._restart_times)} times within "
                f"{self.restart_window:g} s, the most allowed (--engine-max-restarts "
                f"{self.max_restarts}, --engine-restart-window {self.restart_window:g})")

    def _unavailable_reason(self) -> str:
        if self._stopping:
            return "the engine is shutting down; the request was not sent"
        if self.dead:
            return (f"the engine is dead ({describe_exit(self._exit_code)}) and will not be "
                    "restarted; the request was not sent")
        if self.is_ready:
            return "the engine is restarting after a crash; the request was not sent, retry soon"
        return "the engine is not running yet; the request was not sent"

    def _close_transport(self) -> None:
        if self._contexts is not None:
            self._contexts.destroy()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def _task(coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    task = asyncio.create_task(coro, name=f"surge-engine-{name}")
    task.add_done_callback(_log_crash)
    return task


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("%s crashed", task.get_name(), exc_info=task.exception())


def _private_folder() -> str:
    folder = tempfile.mkdtemp(prefix="surge-engine-")  # mode 0700: other users cannot connect
    if len(folder) + len("/output-1000") <= _MAX_IPC_PATH:
        return folder
    shutil.rmtree(folder)
    return tempfile.mkdtemp(prefix="surge-engine-", dir="/tmp")


def _bound(sock: SocketT, address: str) -> SocketT:
    # No high-water marks: admission control bounds the queue, and a send must never wait.
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.bind(address)
    return sock


def _address(folder: str, name: str) -> str:
    return f"ipc://{folder}/{name}"
