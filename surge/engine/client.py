"""`EngineClient`: async access to an engine core, the one seam between server and engine.

``InprocEngineClient`` runs the core on a thread of this process (tests, simple
deployments); the multiprocess client runs it in its own process behind ZMQ. Both stream
``EngineCoreOutput`` updates per request, abort a request whose consumer stops listening,
and raise ``EngineDeadError`` for requests in flight when the engine dies.
"""

from __future__ import annotations

import abc
import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from surge.config import EngineConfig
from surge.engine.protocol import AbortRequests, AddRequest, EngineCoreOutput, EngineStats

if TYPE_CHECKING:
    from surge.engine.core import EngineCore

__all__ = ["EngineClient", "EngineDeadError", "EngineInfo", "InprocEngineClient", "RequestStream",
           "iterate_stream"]


class EngineDeadError(RuntimeError):
    """The engine stopped while this request was in flight; it will not complete."""


class EngineInfo(msgspec.Struct):
    """Static facts about the loaded model, known once the engine is ready."""

    model_dir: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    dtype: str
    device: str
    num_blocks: int
    block_size: int


class EngineClient(abc.ABC):
    _info: EngineInfo | None = None  # set by subclasses once the engine reports ready

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model; returns when the engine is ready to take requests."""

    @property
    def info(self) -> EngineInfo:
        """Facts about the loaded model; only valid once ``is_ready``."""
        if self._info is None:
            raise RuntimeError("the engine is not ready yet")
        return self._info

    @property
    def is_ready(self) -> bool:
        return self._info is not None

    @property
    @abc.abstractmethod
    def is_healthy(self) -> bool: ...

    @abc.abstractmethod
    def generate(self, request: AddRequest) -> AsyncIterator[EngineCoreOutput]:
        """Updates for one request until one carries a finish_reason.

        Raises ValueError when the engine refuses the request and EngineDeadError when it
        dies meanwhile. Leaving the iteration early aborts the request in the engine.
        """

    @abc.abstractmethod
    async def abort(self, request_ids: list[str]) -> None: ...

    @abc.abstractmethod
    def stats(self) -> EngineStats:
        """The latest snapshot of the scheduler and KV cache."""

    @abc.abstractmethod
    async def shutdown(self) -> None: ...


@dataclass
class RequestStream:
    """Per-request mailbox: the engine side puts, the request's coroutine gets."""

    loop: asyncio.AbstractEventLoop
    updates: asyncio.Queue = field(default_factory=asyncio.Queue)

    def put(self, item: EngineCoreOutput | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.updates.put_nowait, item)


async def iterate_stream(stream: RequestStream, request_id: str,
                         abort: Callable[[list[str]], Awaitable[None]]
                         ) -> AsyncIterator[EngineCoreOutput]:
    """Yield a request's updates; abort it in the engine if the consumer leaves early."""
    finished = False
    try:
        while not finished:
            item = await stream.updates.get()
            if isinstance(item, BaseException):
                raise item
            if item.error is not None:
                raise ValueError(item.error)
            finished = item.finish_reason is not None
            yield item
    finally:
        if not finished:
            await abort([request_id])


class InprocEngineClient(EngineClient):
    """The engine core on a background thread of this process."""

    def __init__(self, config: EngineConfig, model_dir: str):
        self.config, self.model_dir = config, model_dir
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._stats = EngineStats()
        self._info: EngineInfo | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dead: BaseException | None = None

    async def start(self) -> None:
        from surge.engine.core import EngineCore

        core = await asyncio.to_thread(EngineCore, self.config, self.model_dir)
        self._info = engine_info(core, self.model_dir)
        self._stats = core.stats()
        self._thread = threading.Thread(target=self._run, args=(core,), daemon=True,
                                        name="surge-engine")
        self._thread.start()

    @property
    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    def generate(self, request: AddRequest) -> AsyncIterator[EngineCoreOutput]:
        if not self.is_healthy:
            raise EngineDeadError("the engine is not running")
        stream = RequestStream(asyncio.get_running_loop())
        self._streams[request.request_id] = stream
        self._commands.put(request)
        return iterate_stream(stream, request.request_id, self.abort)

    async def abort(self, request_ids: list[str]) -> None:
        self._commands.put(AbortRequests(list(request_ids)))

    def stats(self) -> EngineStats:
        return self._stats

    async def shutdown(self) -> None:
        self._stopping.set()
        self._commands.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # -- engine thread ----------------------------------------------------------------------

    def _run(self, core: EngineCore) -> None:
        try:
            while not self._stopping.is_set():
                self._apply_commands(core, block=not core.has_unfinished_requests())
                if core.has_unfinished_requests():
                    self._publish(core.step())
                self._stats = core.stats()
        except BaseException as exc:
            self._dead = exc
            error = EngineDeadError(f"the engine failed: {exc!r}")
            for stream in self._streams.values():
                stream.put(error)
            self._streams.clear()

    def _apply_commands(self, core: EngineCore, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            self._apply(core, command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, core: EngineCore, command: AddRequest | AbortRequests) -> None:
        if isinstance(command, AbortRequests):
            self._publish(core.abort_requests(command.request_ids))
            return
        try:
            core.add_request(command)
        except ValueError as exc:
            self._publish([EngineCoreOutput(command.request_id, [], error=str(exc))])

    def _publish(self, outputs: list[EngineCoreOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finish_reason is not None or output.error is not None:
                del self._streams[output.request_id]
            stream.put(output)


def engine_info(core: EngineCore, model_dir: str) -> EngineInfo:
    loaded = core.loaded
    return EngineInfo(model_dir=model_dir, max_model_len=core.max_model_len,
                      vocab_size=core.vocab_size, eos_token_ids=sorted(core.eos_token_ids),
                      dtype=str(loaded.dtype).replace("torch.", ""), device=str(loaded.device),
                      num_blocks=core.block_manager.num_blocks,
                      block_size=core.block_manager.block_size)
