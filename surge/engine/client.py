"""`EngineClient`: async access to an engine core, the one seam between server and engine.

``EngineClient`` streams ``EngineCoreOutput`` updates per request, aborts a request whose
consumer stops listening, and raises ``EngineDeadError`` for requests in flight when the
engine dies. Its subclasses only carry messages: ``InprocEngineClient`` runs the core on a
thread of this process (tests, simple deployments); the multiprocess client
(``surge.engine.mp_client``) runs it in its own process behind ZMQ.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from surge.config import EngineConfig, check_tenant_weights
from surge.engine.protocol import (
    AbortRequests,
    AddRequest,
    EngineCoreOutput,
    EngineStats,
    ProfileResult,
    SetTenantWeights,
    StartProfile,
)

if TYPE_CHECKING:
    from surge.engine.core import EngineCore

__all__ = ["EngineClient", "EngineDeadError", "EngineInfo", "InprocEngineClient"]


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
    """Streams of engine updates per request, over a transport a subclass supplies.

    This class owns what every client does alike: the map from request id to its stream,
    refusing an id already in flight, delivering engine outputs to their streams, failing
    every stream when the engine dies, and iterating a stream (aborting the request if its
    consumer leaves early). A subclass supplies the transport: ``_send_add`` and ``abort``
    reach the engine, and it hands received outputs to ``_deliver`` and a death to
    ``_fail_all``, on the event loop the client was started on.
    """

    _info: EngineInfo | None = None  # set by subclasses once the engine reports ready
    _profile_waiter: asyncio.Future[ProfileResult] | None = None  # the profile in progress

    def __init__(self) -> None:
        self._streams: dict[str, asyncio.Queue[EngineCoreOutput | BaseException]] = {}
        self._stats = EngineStats()

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

    def generate(self, request: AddRequest) -> AsyncIterator[EngineCoreOutput]:
        """Updates for one request until one carries a finish_reason.

        Raises EngineDeadError at once when the engine cannot take it; the iteration raises
        ValueError when the engine refuses the request (or its id is already in flight) and
        EngineDeadError when the engine dies meanwhile. Leaving the iteration early aborts
        the request in the engine.
        """
        if not self.is_healthy:
            raise EngineDeadError(self._unavailable_reason())
        request_id = request.request_id
        if request_id in self._streams:
            return _fail_on_iteration(ValueError(
                f"request_id={request_id!r} is already in flight: allowed is an id unique "
                "among running requests"))
        stream: asyncio.Queue[EngineCoreOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = stream
        try:
            self._send_add(request)
        except BaseException:
            del self._streams[request_id]
            raise
        return self._iterate(stream, request_id)

    @abc.abstractmethod
    async def abort(self, request_ids: list[str]) -> None: ...

    def stats(self) -> EngineStats:
        """The latest snapshot of the scheduler and KV cache."""
        return self._stats

    async def set_tenant_weights(self, weights: Mapping[str, float]) -> None:
        """Replace the tenant weights of the fair policy (e.g. on a tenants-file reload);
        bad weights raise ValueError here and never reach the engine."""
        self._send_weights(SetTenantWeights(check_tenant_weights(weights)))

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    async def profile(self, num_steps: int, max_seconds: float) -> ProfileResult:
        """Record the engine's next ``num_steps`` steps with torch.profiler (fewer if
        ``max_seconds`` pass first); one profile at a time (ValueError otherwise)."""
        if self._profile_waiter is not None:
            raise ValueError("a profile is already being recorded: allowed is one at a time")
        if not self.is_healthy:
            raise EngineDeadError(self._unavailable_reason())
        waiter = self._profile_waiter = asyncio.get_running_loop().create_future()
        try:
            self._send_profile(StartProfile(num_steps, max_seconds))
            # The engine answers at its first loop turn past the deadline; a long step (or a
            # slow export) may delay that, never by this much.
            return await asyncio.wait_for(waiter, max_seconds + 120)
        finally:
            self._profile_waiter = None

    # -- transport hooks ---------------------------------------------------------------------

    def _send_add(self, request: AddRequest) -> None:
        """Hand a request to the engine without waiting, so adds and aborts keep their order;
        raise EngineDeadError if it cannot be sent. A client that overrides ``generate``
        (one that never generates) need not supply it."""
        raise NotImplementedError(f"{type(self).__name__} has no transport to send requests")

    def _send_weights(self, command: SetTenantWeights) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no engine to set weights on")

    def _send_profile(self, command: StartProfile) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no engine to profile")

    def _profiled(self, result: ProfileResult) -> None:
        """The engine's answer to ``profile`` (on the client's loop)."""
        if self._profile_waiter is not None and not self._profile_waiter.done():
            self._profile_waiter.set_result(result)

    def _unavailable_reason(self) -> str:
        """Why ``generate`` is refused while the client is not healthy."""
        return "the engine is not running"

    # -- streams -----------------------------------------------------------------------------

    def _deliver(self, outputs: Iterable[EngineCoreOutput]) -> None:
        """Put each output on its request's stream; a finished request's stream closes."""
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # its consumer left and the request was aborted
            if output.finish_reason is not None or output.error is not None:
                del self._streams[output.request_id]
            stream.put_nowait(output)

    def _fail_all(self, error: EngineDeadError) -> None:
        """End every stream in flight with ``error``: the engine will not complete them."""
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream.put_nowait(error)
        if self._profile_waiter is not None and not self._profile_waiter.done():
            self._profile_waiter.set_exception(error)

    async def _iterate(self, stream: asyncio.Queue[EngineCoreOutput | BaseException],
                       request_id: str) -> AsyncIterator[EngineCoreOutput]:
        """Yield a request's updates; abort it in the engine if the consumer leaves early."""
        finished = False
        try:
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                if item.error is not None:
                    raise ValueError(item.error)
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                await self.abort([request_id])


async def _fail_on_iteration(error: Exception) -> AsyncIterator[EngineCoreOutput]:
    raise error
    yield  # an async generator, like every other generate() result


class InprocEngineClient(EngineClient):
    """The engine core on a background thread of this process.

    The engine thread posts each step's outputs to the event loop that called ``start``, so
    the streams are only ever touched on that loop.
    """

    def __init__(self, config: EngineConfig, model_dir: str):
        super().__init__()
        self.config, self.model_dir = config, model_dir
        self._commands: queue.Queue = queue.Queue()
        self._info: EngineInfo | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._dead: BaseException | None = None

    async def start(self) -> None:
        from surge.engine.core import EngineCore

        core = await asyncio.to_thread(EngineCore, self.config, self.model_dir)
        self._info = engine_info(core, self.model_dir)
        self._stats = core.stats()
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, args=(core,), daemon=True,
                                        name="surge-engine")
        self._thread.start()

    @property
    def is_healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    async def abort(self, request_ids: list[str]) -> None:
        self._commands.put(AbortRequests(list(request_ids)))

    async def shutdown(self) -> None:
        self._stopping.set()
        self._commands.put(None)
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        self._fail_all(EngineDeadError("the engine was shut down before the request "
                                       "completed"))

    def _send_add(self, request: AddRequest) -> None:
        self._commands.put(request)

    def _send_weights(self, command: SetTenantWeights) -> None:
        self._commands.put(command)

    def _send_profile(self, command: StartProfile) -> None:
        self._commands.put(command)

    # -- engine thread ----------------------------------------------------------------------

    def _run(self, core: EngineCore) -> None:
        try:
            while not self._stopping.is_set():
                self._apply_commands(core, block=not core.has_unfinished_requests())
                if core.has_unfinished_requests():
                    self._publish(core.step())
                self._stats = core.stats()
                if core.profiler is not None and (result := core.take_profile()) is not None:
                    self._post(self._profiled, result)
        except BaseException as exc:
            self._dead = exc  # first: from now on generate() refuses, so no stream is missed
            self._post(self._fail_all, EngineDeadError(f"the engine failed: {exc!r}"))

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

    def _apply(self, core: EngineCore,
               command: AddRequest | AbortRequests | SetTenantWeights | StartProfile) -> None:
        if isinstance(command, StartProfile):
            if (refused := core.start_profile(command)) is not None:
                self._post(self._profiled, refused)
            return
        if isinstance(command, AbortRequests):
            self._publish(core.abort_requests(command.request_ids))
            return
        if isinstance(command, SetTenantWeights):
            core.set_tenant_weights(command.weights)
            return
        try:
            core.add_request(command)
        except ValueError as exc:
            self._publish([EngineCoreOutput(command.request_id, [], error=str(exc))])

    def _publish(self, outputs: list[EngineCoreOutput]) -> None:
        if outputs:
            self._post(self._deliver, outputs)

    def _post(self, callback: Callable[[Any], None], argument: Any) -> None:
        assert self._loop is not None, "start() sets the loop before the thread runs"
        with contextlib.suppress(RuntimeError):  # the loop is closed: no one is listening
            self._loop.call_soon_threadsafe(callback, argument)


def engine_info(core: EngineCore, model_dir: str) -> EngineInfo:
    loaded = core.loaded
    return EngineInfo(model_dir=model_dir, max_model_len=core.max_model_len,
                      vocab_size=core.vocab_size, eos_token_ids=sorted(core.eos_token_ids),
                      dtype=str(loaded.dtype).replace("torch.", ""), device=str(loaded.device),
                      num_blocks=core.block_manager.num_blocks,
                      block_size=core.block_manager.block_size)
