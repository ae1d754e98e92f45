"""Stopping a long command cleanly on SIGINT (Ctrl-C) or SIGTERM (what a cluster scheduler sends first).

`with StopSignals() as stop:` replaces the two handlers for the block. The first signal only sets
`stop.signum`; the loop in the block checks it at its next safe point (training: after the current step, then a
checkpoint; sampling: after the current batch), stops and says how to resume. A second signal quits at once
(exit status 128 + the signal's number) without waiting for the safe point. Copies of the same signal that
arrive within `grace` seconds of the first count as the first: torchrun forwards the signal it receives to its
workers, which the terminal has already sent the same Ctrl-C to.

Outside the main thread (where Python cannot install handlers) the block runs with the handlers as they were.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
import time

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_status(signum: int) -> int:
    """The shell's status of a process stopped by `signum`: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """First SIGINT / SIGTERM: `signum` is set (stop at the next safe point). A second one: quit at once."""

    def __init__(self, program: str = "mfrae", grace: float = 1.0):
        self.program, self.grace = program, grace
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
            return
        if time.monotonic() - self._first_at < self.grace:
            return  # the launcher's copy of the first signal
        sys.stderr.write(f"{self.program}: {signal_name(signum)} again: quit at once, without writing anything "
                         "more; what was complete before is kept\n")
        sys.stderr.flush()
        os._exit(exit_status(signum))


def resume_command(command: list[str], world_size: int = 1, local_world_size: int | None = None) -> str:
    """The shell command that continues the run `command` (["mfrae", ...]) started: `--overwrite` dropped,
    `--resume` added, and under torchrun the launcher with the same number of processes per node."""
    args = [a for a in command if a not in ("--resume", "--overwrite")] + ["--resume"]
    if world_size > 1:
        per_node = local_world_size or world_size
        nodes = world_size // per_node
        launcher = ["torchrun", *(["--nnodes", str(nodes)] if nodes > 1 else []), "--nproc_per_node", str(per_node),
                    "-m", *args]
        return shlex.join(launcher)
    return shlex.join(args)
