"""stop_signals.py on small scripts that stand in for the libraries a real start-up imports: a signal ends the
script with one line even where a library drops or rewraps the exception (trimesh's `except BaseException` around an
import, JAX's gc callback, a __del__ method); the real scripts' start-up is tested in test_rfcl_integration.py."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT

HEAD = f"import sys\nsys.path.insert(0, {str(ROOT)!r})\nimport stop_signals\nimport gc, time\n"
SCRIPTS = {
    # a library that catches BaseException around one of its imports (trimesh does), while the script still imports
    "dropped during the imports": """
        try:
            print("ready", flush=True)
            time.sleep(20)
        except BaseException:
            pass
        print("went on", flush=True)
        stop_signals.exit_if_signalled()
        """,
    # after the imports: JAX's gc callback drops what is raised in it
    "inside a gc callback": """
        stop_signals.exit_if_signalled()
        calls = []
        def slow(phase, info):
            if phase == "start" and len(calls) < 20:
                calls.append(1)
                time.sleep(0.25)
        gc.callbacks.append(slow)
        print("ready", flush=True)
        t = time.time()
        while time.time() - t < 20:
            gc.collect()
        print("went on", flush=True)
        """,
    # after the imports: Python drops what a __del__ method raises too
    "inside a __del__": """
        stop_signals.exit_if_signalled()
        calls = []
        class Slow:
            def __del__(self):
                if len(calls) < 20:
                    calls.append(1)
                    time.sleep(0.25)
        print("ready", flush=True)
        t = time.time()
        while time.time() - t < 20:
            Slow()
        print("went on", flush=True)
        """,
    # after the imports, dropped by other code: honoured at the script's next exit_if_signalled
    "dropped after the imports": """
        stop_signals.exit_if_signalled()
        try:
            print("ready", flush=True)
            time.sleep(20)
        except BaseException:
            pass
        stop_signals.exit_if_signalled()
        print("went on", flush=True)
        """,
}


@pytest.mark.parametrize("case", SCRIPTS)
def test_a_signal_ends_the_script_with_one_line_where_a_library_drops_the_exit(case, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(HEAD + textwrap.dedent(SCRIPTS[case]))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)  # inside the slow part: the first 20 calls take 5 s
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert (proc.returncode, out, err) == (130, "", "stopped by SIGINT\n")


def test_imported_by_a_module_it_changes_no_handler(tmp_path):
    """A test or a notebook that imports rfcl keeps its own Ctrl-C (KeyboardInterrupt)."""
    (tmp_path / "lib.py").write_text("import stop_signals\n")
    code = (f"import sys, signal; sys.path[:0] = [{str(ROOT)!r}, {str(tmp_path)!r}]; import lib; "
            f"print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "True"


def test_an_env_worker_signalled_while_it_starts_neither_dies_nor_prints():
    """Ctrl-C goes to the whole process group, env workers included, and a worker's new interpreter turns it into a
    "Fatal Python error" and a traceback while it starts up (before it can ignore the signal). Started by
    workers_start_deaf, it begins with the stop signals blocked: SIGINT all through its start-up and its work leaves
    it running, silent; the parent's own mask and the spawn context are as before."""
    code = textwrap.dedent(f"""
        import multiprocessing, os, signal, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        import stop_signals
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        with stop_signals.workers_start_deaf():
            p = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(2,))
            p.start()
        t0 = time.time()
        while time.time() - t0 < 1.5:  # from its first instruction on, through the interpreter's start-up
            os.kill(p.pid, signal.SIGINT)
            time.sleep(0.005)
        p.join(30)
        print(p.exitcode, signal.pthread_sigmask(signal.SIG_BLOCK, []) == before,
              multiprocessing.get_context("spawn").Process is multiprocessing.context.SpawnProcess)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (out.stdout, out.stderr) == ("0 True True\n", "")
