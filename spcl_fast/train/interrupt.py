"""Graceful stops: SIGTERM or SIGINT ask the run to finish its current step, write a checkpoint
and return; a second SIGINT aborts at once (``KeyboardInterrupt``).

Schedulers announce preemption with SIGTERM (SLURM's ``--signal``, Kubernetes pod deletion,
``torchrun`` forwarding its own SIGTERM to the workers, then SIGKILL ~30 s later): the step in
flight finishes, the checkpoint is written and the process exits with ``128 + signal`` (143 for
SIGTERM, 130 for SIGINT), the shell's code for "stopped by that signal", so a wrapper or a job
controller restarts it with ``--resume`` instead of taking it for a finished run.
"""

from __future__ import annotations

import signal
import sys
import threading


class GracefulStop:
    """Context manager: while active, SIGTERM/SIGINT set :attr:`signum` instead of killing the
    process; the previous handlers come back on exit. Outside the main thread (where Python
    cannot install handlers) it does nothing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
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
        if self.signum is not None and signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt("second SIGINT: aborting without a checkpoint")
        if self.signum is None:
            self.signum = signum
            sys.stderr.write(
                f"\n{signal.Signals(signum).name}: finishing this step, then writing a "
                f"checkpoint (Ctrl-C again to abort)\n"
            )
