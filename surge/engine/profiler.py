"""`torch.profiler` over the next N engine steps, in the engine's own process.

``POST /debug/profile`` (``--enable-profiler``) asks the engine for a profile: the engine
starts ``torch.profiler`` at once, marks each step (``surge.step``), and after ``num_steps``
steps, or ``max_seconds`` if the engine is idle meanwhile, stops it and answers with the
Chrome trace (open it in Perfetto or chrome://tracing). Profiling slows the steps it records,
so it is off unless asked, and one profile runs at a time.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

import torch

from surge.engine.protocol import ProfileResult

__all__ = ["MAX_PROFILE_STEPS", "StepProfiler"]

MAX_PROFILE_STEPS = 10_000


class StepProfiler:
    """One recording: ``step()`` wraps each engine step; ``result()`` once ``done``."""

    def __init__(self, num_steps: int, max_seconds: float) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.num_steps = num_steps
        self.deadline = time.monotonic() + max_seconds
        self.recorded = 0
        self._profile = torch.profiler.profile(activities=activities)
        self._profile.__enter__()

    def step(self) -> contextlib.AbstractContextManager[object]:
        """Around one engine step: a named range in the trace."""
        self.recorded += 1
        return torch.profiler.record_function(f"surge.step#{self.recorded}")

    @property
    def done(self) -> bool:
        return self.recorded >= self.num_steps or time.monotonic() >= self.deadline

    def result(self) -> ProfileResult:
        """Stop recording and export the Chrome trace (through a temporary file: that is
        the only way torch exports it)."""
        self._profile.__exit__(None, None, None)
        handle, path = tempfile.mkstemp(prefix="surge-profile-", suffix=".json")
        os.close(handle)
        try:
            self._profile.export_chrome_trace(path)
            with open(path, "rb") as file:
                return ProfileResult(file.read(), self.recorded)
        finally:
            os.unlink(path)
