"""SIGTERM and SIGINT (a cluster's pre-emption, Ctrl-C) as a clean stop with a one-line message.

Two layers. The entry point turns a signal that arrives where nothing can be saved (start-up, evaluation) into a
`Preempted` exit whose message says that finished work is kept. Stages that make progress worth saving (training,
latent caching) hold a `PreemptionFlag` instead: the signal only sets the flag, the stage finishes the unit of work
in progress (a step, a shard), saves it and exits with a `Preempted` that says where.
"""
from __future__ import annotations

import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(SystemExit):
    """Stopped by a signal; the message says what was kept and that rerunning the command resumes."""


class PreemptionFlag:
    """Within `with PreemptionFlag() as flag:`, SIGTERM/SIGINT set `flag.signal_name` instead of stopping."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __enter__(self):
        for sig in SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# The first signal received while signals were deferred (defer_signals), if any.
_deferred: str | None = None


def _preempted(signal_name: str) -> Preempted:
    return Preempted(f"received {signal_name} outside a step that saves: finished work (checkpoints, cache shards, "
                     f"completed stages) is kept; rerun the same command to go on")


def _exit_on_signal(signum, frame):
    raise _preempted(signal.Signals(signum).name)


def _remember_signal(signum, frame):
    global _deferred
    _deferred = _deferred or signal.Signals(signum).name


def defer_signals() -> None:
    """Until exit_cleanly_on_signals: a SIGTERM/SIGINT is remembered and acted on then. For the imports of start-up:
    an exception raised by a handler while torch is being imported can unwind through its C++ (pybind11), which
    aborts the process, or surface as another exception, which Hydra prints with a traceback."""
    for sig in SIGNALS:
        signal.signal(sig, _remember_signal)


def exit_cleanly_on_signals() -> None:
    """From here on a SIGTERM/SIGINT outside a PreemptionFlag exits with one line instead of a traceback or a
    silent death; a signal remembered since defer_signals exits now."""
    if _deferred is not None:
        raise _preempted(_deferred)
    for sig in SIGNALS:
        signal.signal(sig, _exit_on_signal)


def leave_signals_to_the_main_process(worker_id: int) -> None:
    """DataLoader `worker_init_fn`. Ctrl-C reaches every process of the terminal's group, and a scheduler may
    signal every process of a job: loader workers ignore SIGINT/SIGTERM, so that the main process alone decides
    (finish the step, save, exit) and shuts its workers down, instead of a worker dying with a traceback."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
