"""The engine core in its own process, fed and drained over ZMQ.

Why a process: the API server's HTTP parsing, tokenization and JSON would otherwise take the
GIL from the step loop, and a crash in torch would take the server down with it. The client
(``MPEngineClient``) binds two sockets and spawns this process, which connects to them:

    client PUSH ──EngineInput──▶ PULL engine      Add · Abort · Shutdown
    client PULL ◀─EngineMessage── PUSH engine     Ready | StartupFailed, then StepOutputs...,
                                                  EngineFailed as its last words on a crash

Every message is a tagged msgspec struct encoded as msgpack: no pickles cross the wire. The
loop drains all pending inputs before each step, so an abort lands before the next step and
the request's KV blocks are freed in it; each step's outputs go out as one message.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from types import FrameType
from typing import TYPE_CHECKING

import msgspec
import zmq

from surge.config import EngineConfig
from surge.engine.client import EngineInfo, engine_info
from surge.engine.protocol import (
    AbortRequests,
    AddRequest,
    EngineCoreOutput,
    EngineStats,
    ProfileResult,
    SetTenantWeights,
    StartProfile,
)
from surge.engine.request import FinishReason
from surge.procs import JsonFormatter

if TYPE_CHECKING:
    from surge.engine.core import EngineCore

__all__ = [
    "Abort", "Add", "EngineFailed", "EngineInput", "EngineMessage", "Profile", "Profiled",
    "Ready", "Shutdown", "StartupFailed", "StepOutputs", "Weights", "run_engine_process",
]

logger = logging.getLogger(__name__)

# While idle the engine still reports its stats this often, and notices a dead parent.
HEARTBEAT_SECONDS = 0.5
# How long a closing engine keeps trying to deliver its last messages.
FLUSH_MILLISECONDS = 2000


# -- client -> engine --------------------------------------------------------------------------

class Add(msgspec.Struct, tag="add", array_like=True):
    request: AddRequest


class Abort(msgspec.Struct, tag="abort", array_like=True):
    abort: AbortRequests


class Weights(msgspec.Struct, tag="weights", array_like=True):
    weights: SetTenantWeights


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    pass


class Profile(msgspec.Struct, tag="profile", array_like=True):
    profile: StartProfile


EngineInput = Add | Abort | Weights | Shutdown | Profile


# -- engine -> client --------------------------------------------------------------------------

class Ready(msgspec.Struct, tag="ready", array_like=True):
    info: EngineInfo
    stats: EngineStats


class StartupFailed(msgspec.Struct, tag="startup_failed", array_like=True):
    error: str


class StepOutputs(msgspec.Struct, tag="outputs", array_like=True):
    """Everything one step (or one idle heartbeat) produced, with the stats after it."""

    outputs: list[EngineCoreOutput]
    stats: EngineStats


class EngineFailed(msgspec.Struct, tag="failed", array_like=True):
    error: str


class Profiled(msgspec.Struct, tag="profiled", array_like=True):
    result: ProfileResult


EngineMessage = Ready | StartupFailed | StepOutputs | EngineFailed | Profiled


class _Terminated(BaseException):
    """SIGTERM arrived: leave the loop and exit 0 (a BaseException, so no `except Exception`
    in the engine mistakes it for a failure)."""


def run_engine_process(config_msgpack: bytes, model_dir: str, input_address: str,
                       output_address: str, parent_pid: int, log_level: int,
                       json_logs: bool = False) -> None:
    """Entry point of the engine process (a multiprocessing "spawn" target).

    The config travels as msgpack, so it is validated again on this side. Exits 0 on a
    Shutdown message, or when the parent is gone (also on SIGTERM then); 1 if loading or a
    step fails. SIGTERM while the server lives is ignored: it reaches the whole process group
    (systemd, ``kill -TERM -- -PGID``) and the server drains its requests first, then stops
    the engine itself (a Shutdown message, SIGKILL if that fails).
    """
    # Ctrl-C reaches the whole process group: the server handles it and shuts us down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGHUP to the group (reload the tenants file, a closed terminal) is the server's: the
    # engine gets the new tenant weights as a message, and must not die of it.
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    global _PARENT_PID
    _PARENT_PID = parent_pid
    signal.signal(signal.SIGTERM, _on_sigterm)
    if json_logs:  # --log-format json: the server's lines and ours read alike
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logging.basicConfig(level=log_level, handlers=[handler])
    else:
        logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s "
                            "surge.engine[%(process)d] %(message)s")
    context = zmq.Context()
    inputs = _socket(context, zmq.PULL, input_address)
    outputs = _socket(context, zmq.PUSH, output_address)
    try:
        exit_code = _serve(config_msgpack, model_dir, inputs, outputs, parent_pid)
    except _Terminated:
        logger.info("SIGTERM: the engine exits")
        exit_code = 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # from here on, SIGTERM just kills
        inputs.close(linger=0)
        outputs.close(linger=0 if os.getppid() != parent_pid else FLUSH_MILLISECONDS)
        context.term()
        if os.getppid() != parent_pid:
            _remove_orphaned_folder(input_address)
    sys.exit(exit_code)


def _remove_orphaned_folder(address: str) -> None:
    """A server that died hard left its private socket folder behind: nobody else will."""
    if address.startswith("ipc://"):
        shutil.rmtree(os.path.dirname(address.removeprefix("ipc://")), ignore_errors=True)


# The server that started this engine: while it lives, it decides when the engine stops.
_PARENT_PID: int | None = None


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    if os.getppid() == _PARENT_PID:
        # No logging here: a handler may run inside a logging call of the interrupted code.
        os.write(2, b"surge.engine: SIGTERM ignored while the server lives: it drains its "
                    b"requests, then stops the engine\n")
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM kills outright
    raise _Terminated


def _socket(context: zmq.Context, kind: int, address: str) -> zmq.Socket:
    sock = context.socket(kind)
    # No high-water marks: admission control bounds the queue, and the engine must never
    # block on a send (a slow reader would stall every request).
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(address)
    return sock


def _serve(config_msgpack: bytes, model_dir: str, inputs: zmq.Socket, outputs: zmq.Socket,
           parent_pid: int) -> int:
    encoder = msgspec.msgpack.Encoder()
    try:
        core = _load_core(config_msgpack, model_dir)
    except Exception as exc:
        logger.exception("the engine could not load %s", model_dir)
        outputs.send(encoder.encode(StartupFailed(f"{type(exc).__name__}: {exc}")))
        return 1
    outputs.send(encoder.encode(Ready(engine_info(core, model_dir), core.stats())))
    try:
        EngineLoop(core, inputs, outputs, parent_pid).run()
    except Exception as exc:
        logger.exception("the engine failed")
        outputs.send(encoder.encode(EngineFailed(f"{type(exc).__name__}: {exc}")))
        return 1
    return 0


def _load_core(config_msgpack: bytes, model_dir: str) -> EngineCore:
    from surge.engine.core import EngineCore  # here: importing torch takes seconds

    config = msgspec.msgpack.decode(config_msgpack, type=EngineConfig)
    return EngineCore(config, model_dir)


class EngineLoop:
    """Step while there is work; block on the input socket (with a heartbeat) while idle."""

    def __init__(self, core: EngineCore, inputs: zmq.Socket, outputs: zmq.Socket,
                 parent_pid: int):
        self.core, self.inputs, self.outputs = core, inputs, outputs
        self.parent_pid = parent_pid
        self.poller = zmq.Poller()
        self.poller.register(inputs, zmq.POLLIN)
        self.decoder = msgspec.msgpack.Decoder(EngineInput)
        self.encoder = msgspec.msgpack.Encoder()
        self.stopping = False

    def run(self) -> None:
        while not self.stopping and self._parent_alive():
            if (not self.core.has_unfinished_requests()
                    and not self.poller.poll(int(HEARTBEAT_SECONDS * 1000))):
                self._send([])  # idle heartbeat: fresh stats
                self._send_profile()
                continue
            outputs = self._drain_inputs()
            if self.stopping:
                break
            if self.core.has_unfinished_requests():
                outputs.extend(self.core.step())
            self._send(outputs)
            self._send_profile()

    def _send_profile(self) -> None:
        result = self.core.take_profile() if self.core.profiler is not None else None
        if result is not None:
            self.outputs.send(self.encoder.encode(Profiled(result)))

    def _parent_alive(self) -> bool:
        # Re-parented (to init or a subreaper) means the server is gone: nobody will read.
        if os.getppid() == self.parent_pid:
            return True
        logger.warning("the server process %d is gone; the engine exits", self.parent_pid)
        return False

    def _drain_inputs(self) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        while not self.stopping:
            try:
                data = self.inputs.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            self._apply(data, outputs)
        return outputs

    def _apply(self, data: bytes, outputs: list[EngineCoreOutput]) -> None:
        try:
            message = self.decoder.decode(data)
        except msgspec.ValidationError as exc:  # e.g. SamplingParams refused on decode
            outputs.extend(_refuse(_request_id_of(data), str(exc)))
            return
        if isinstance(message, Add):
            try:
                self.core.add_request(message.request)
            except ValueError as exc:
                outputs.extend(_refuse(message.request.request_id, str(exc)))
        elif isinstance(message, Abort):
            outputs.extend(self.core.abort_requests(message.abort.request_ids))
        elif isinstance(message, Weights):
            self.core.set_tenant_weights(message.weights.weights)  # checked by the client
        elif isinstance(message, Profile):
            refused = self.core.start_profile(message.profile)
            if refused is not None:
                self.outputs.send(self.encoder.encode(Profiled(refused)))
        else:
            self.stopping = True

    def _send(self, outputs: list[EngineCoreOutput]) -> None:
        self.outputs.send(self.encoder.encode(StepOutputs(outputs, self.core.stats())))


def _refuse(request_id: str | None, error: str) -> list[EngineCoreOutput]:
    if request_id is None:
        logger.error("dropped an input the engine could not decode: %s", error)
        return []
    return [EngineCoreOutput(request_id, [], finish_reason=FinishReason.ABORT, error=error)]


def _request_id_of(data: bytes) -> str | None:
    """The request id of an Add that failed validation, so its sender hears why."""
    try:
        kind, request = msgspec.msgpack.decode(data)  # ["add", {"request_id": ..., ...}]
        request_id = request["request_id"] if kind == "add" else None
    except (msgspec.DecodeError, ValueError, TypeError, KeyError):
        return None
    return request_id if isinstance(request_id, str) else None
