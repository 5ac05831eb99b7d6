"""Ctrl-C, SIGTERM and SIGHUP from a script's first line: read it when a stop signal does not do what you expect.

Each entry script (rfcl.py, rlpd.py, collect_demos.py, benchmarks/frontier.py, and your copy of one) imports this
module before anything else. Its imports that follow take seconds (JAX, torch, ManiSkill), and there Python's own
Ctrl-C prints a traceback from deep inside one of them, or is lost: trimesh catches BaseException around an import,
JAX's gc callback drops what is raised in it, and the run goes on to train. From here until a loop takes the signals
over (StopRequest, below, which saves first), each of SIGNALS prints one line, "stopped by SIGINT", ends the env
workers and exits (128 + the signal's number: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP, which a closed terminal
or a dropped ssh session sends); nothing has been written by then. An exit that is still dropped happens
at the script's next exit_if_signalled. Imported by a test or a notebook, this module changes no handler.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import multiprocessing.context
import os
from multiprocessing import resource_tracker
import signal
import sys
import threading
import warnings

from tqdm import tqdm

# the stop signals: Ctrl-C, kill / Slurm's warning, and a closed terminal or dropped ssh session
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_SIGNALLED = []  # the signals received; see exit_if_signalled
_IMPORTS_DONE = []  # set by the script's first exit_if_signalled, once its slow imports are done


def _stop(signum, frame):
    if _dropped_there(frame):  # an exception raised here would be printed and dropped: deliver the signal again
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    _SIGNALLED.append(signal.Signals(signum).name)
    quiet_if_terminal_gone(signum)
    print(f"stopped by {_SIGNALLED[-1]}", file=sys.stderr, flush=True)
    if not _IMPORTS_DONE:  # nothing to clean up yet, and an exception raised inside a library's import may be
        os._exit(128 + signum)  # dropped (trimesh) or turned into another one (a class's __set_name__)
    _exit()


def _exit():
    for worker in multiprocessing.active_children():  # env workers: they hold nothing to save, and left alive they
        worker.kill()  # would print a traceback each once this process has closed their pipes
    raise SystemExit(128 + signal.Signals[_SIGNALLED[0]].value)


def quiet_if_terminal_gone(signum: int) -> None:
    """After SIGHUP from a closed terminal, writing to it fails (EIO) wherever a line or a progress bar is printed:
    stdout and stderr that were that terminal go to /dev/null from here, so the run can still save and exit."""
    if signum != signal.SIGHUP:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        if os.isatty(fd):
            os.dup2(null, fd)
    os.close(null)


def _dropped_there(frame) -> bool:
    """Is a gc callback (JAX registers one) or a __del__ method on the stack? Python reports what they raise and
    drops it."""
    codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
    while frame is not None:
        if frame.f_code in codes or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def exit_on_signals() -> None:
    """Each of SIGNALS: one line and an exit at once. multiprocessing's resource tracker (a process of the same group,
    which the env workers' shared memory needs) ignores SIGINT and SIGTERM itself; it is started here ignoring SIGHUP
    too (an ignored signal stays ignored in the program it executes), since a closed terminal would otherwise kill it
    and its replacement print a traceback for every shared block it never knew."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.signal(signal.SIGHUP, previous)
    for sig in SIGNALS:
        signal.signal(sig, _stop)


class _WorkerProcess(multiprocessing.context.SpawnProcess):
    """A spawned process that begins with SIGNALS blocked (a child inherits its parent's signal mask through fork and
    exec). A new Python interpreter answers SIGINT with KeyboardInterrupt from its first import on, and one caught in
    its start-up prints "Fatal Python error" and a traceback: a terminal's Ctrl-C, sent to the whole process group,
    did that to an env worker that was just starting. Blocked, the signal waits until the worker ignores it (it does
    once it imports the script again, or in vector_env.CPUWorkerEnv), which discards it. The parent's mask is
    blocked only while it starts the process, so it loses nothing: a signal that came meanwhile is delivered then."""

    @staticmethod
    def _Popen(process_obj):
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            return multiprocessing.context.SpawnProcess._Popen(process_obj)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def workers_start_deaf():
    """The processes that multiprocessing's spawn context starts in this block (gymnasium's env workers) are
    _WorkerProcesses."""
    ctx = multiprocessing.get_context("spawn")
    ctx.Process = _WorkerProcess  # shadows the context's class attribute until the block ends
    try:
        yield
    finally:
        del ctx.Process


def exit_if_signalled() -> None:
    """A signal whose SystemExit was dropped ends the process here. Each script calls it once its slow imports are
    done (until then a signal ends the process at once, without clean-up: there is nothing to clean up), and again
    just before it writes anything."""
    _IMPORTS_DONE.append(True)
    if _SIGNALLED:
        _exit()


def _importer() -> str:
    """__name__ of the module whose import statement runs this one: "__main__" for `python rfcl.py`, "__mp_main__"
    when an env worker (a spawned process) imports the script again to find its functions."""
    frame = sys._getframe(2)  # past this function and this module's body
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""


class StopRequest:
    """Ctrl-C (SIGINT), a plain kill / Slurm's warning (SIGTERM) or a closed terminal (SIGHUP) ends a run at the next
    iteration boundary, after it has saved, instead of killing it mid-update. An impatient second signal changes
    nothing (the save goes on: it is what keeps the work); a third stops at once, saying what is lost (`lost`), with
    the env workers ended first and any half-written file removed (write_atomic)."""

    def __init__(self, lost: str = "this save point's resume state is not written; --resume continues from the "
                                   "previous save point, whose files are intact"):
        self.name, self.exit_code, self.count, self.lost = None, 0, 0, lost
        self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        self.count += 1
        name = signal.Signals(signum).name
        if self.name is None:
            quiet_if_terminal_gone(signum)
            self.name, self.exit_code = name, 128 + signum
            tqdm.write(f"{name}: saving and stopping after this iteration (a third signal stops at once, unsaved)",
                       file=sys.stderr)
        elif self.count == 2:
            tqdm.write(f"{name} again: still saving, which keeps the work; once more stops at once, without the save",
                       file=sys.stderr)
        else:
            for worker in multiprocessing.active_children():
                worker.kill()
            tqdm.write(f"stopped at once by a third signal ({name}): {self.lost}", file=sys.stderr)
            warnings.simplefilter("ignore")  # gymnasium's warnings as the abandoned envs are collected at exit
            raise SystemExit(self.exit_code)

    def __bool__(self) -> bool:
        return self.name is not None


_IMPORTER = _importer()
if _IMPORTER == "__main__":
    exit_on_signals()
elif _IMPORTER == "__mp_main__":  # an env worker: Ctrl-C reaches the whole process group; the main process decides
    for _sig in SIGNALS:
        signal.signal(_sig, signal.SIG_IGN)
