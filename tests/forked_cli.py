"""Many ``genlab`` invocations for the price of one interpreter start (the tables of refused inputs).

    python tests/forked_cli.py <plan.json> <results folder>

Each refused input is a real process that runs the real ``genlab`` command: its exit status, its stdout and its
stderr are what a user sees. What costs is not the refusal but the start: importing torch, Hydra and the CLI,
seconds for each of dozens of cases. This driver imports them once, then forks a child per invocation, and the child
becomes what ``genlab ...`` (the console script) or ``python -m lab_utils.commands.cli ...`` would be: the
invocation's working folder, ``sys.argv``, ``sys.path[0]`` (the script's folder, not the working folder: a module
lying beside a hostile checkpoint is not importable; for ``-m``, the working folder, as Python puts it there), stdout
and stderr on files of their own, the script or module run as ``__main__`` (a ``-m`` module's preloaded copy is
dropped first, as a fresh ``python -m`` has none), and the interpreter's exit (the status of ``sys.exit``, a
traceback and status 1 for an uncaught exception, atexit handlers, stdio flushed: see
:func:`_exit_as_the_interpreter_would`).

The driver runs no torch operation before it forks: a child cannot use an OpenMP thread pool its parent started.
The plan is a JSON list of ``{"command": [...], "args": [...], "cwd": "..."}``; the results folder gets
``<i>.stdout``, ``<i>.stderr`` and ``status.json`` (the exit status of each, as subprocess reports it: negative for
a signal). :func:`run_genlab_many` is the test side: a ``subprocess.CompletedProcess`` per invocation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CONCURRENT = 2  # children at once: they are short and the machine has two cores

# What every refusal imports anyway (lab_utils.commands.cli's error report imports the harness, and with it torch).
PRELOAD = ["torch", "omegaconf", "hydra", "lab_utils.commands.cli", "lab_utils.harness.checkpoint",
           "lab_utils.harness.trainer", "lab_utils.harness.run", "lab_utils.harness.run_folder",
           "lab_utils.commands.grading"]


def run_genlab_many(command: list[str], invocations: list[tuple[list[str], Path]], results: Path,
                    env: dict[str, str], timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """``command`` (``[<the genlab console script>]`` or ``[sys.executable, "-m", <module>]``) run with each ``(args,
    cwd)``, as ``subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True)`` would report
    it; ``results`` is an empty folder for the outputs."""
    assert len(command) == 1 or (len(command) == 3 and command[1] == "-m"), command
    results.mkdir(parents=True, exist_ok=True)
    plan = results / "plan.json"
    plan.write_text(json.dumps([{"command": command, "args": args, "cwd": str(cwd)} for args, cwd in invocations]))
    driver = subprocess.Popen([sys.executable, __file__, str(plan), str(results)], env=env, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = driver.communicate(timeout=timeout)
    except BaseException:
        os.killpg(driver.pid, 9)  # the driver and its children (a session of their own), should one hang
        driver.wait()
        raise
    assert driver.returncode == 0, stderr[-3000:]
    status = json.loads((results / "status.json").read_text())
    return [subprocess.CompletedProcess([*command, *args], status[index], (results / f"{index}.stdout").read_text(),
                                        (results / f"{index}.stderr").read_text())
            for index, (args, _) in enumerate(invocations)]


def _fork_each(plan: list[dict], results: Path) -> dict | None:
    """In the driver: fork a child per invocation, wait for all, write status.json and return None. In a child:
    return its invocation (with ``"index"``)."""
    import gc
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the children's collections skip what the driver holds (scanning it would copy its pages)
    running: dict[int, int] = {}  # pid -> index
    status: dict[int, int] = {}
    for index, item in enumerate(plan):
        while len(running) >= CONCURRENT:
            pid, wait_status = os.wait()
            status[running.pop(pid)] = os.waitstatus_to_exitcode(wait_status)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            return {**item, "index": index}
        running[pid] = index
    while running:
        pid, wait_status = os.wait()
        status[running.pop(pid)] = os.waitstatus_to_exitcode(wait_status)
    (results / "status.json").write_text(json.dumps([status[index] for index in range(len(plan))]))
    return None


def _exit_as_the_interpreter_would(run) -> None:
    """Call ``run`` and end this process as Python ends a script: the status of ``SystemExit`` (None: 0; a message:
    printed, 1), or a traceback and 1; then non-daemon threads joined, atexit handlers (logging's flush, weakref
    finalizers such as TemporaryDirectory's) and stdio flushed, and ``os._exit``. The interpreter's last step, freeing
    every module, is skipped: in a fork of a process that holds torch it writes to every page the two share, a second
    of CPU per child, and it runs no code a command relies on."""
    import atexit
    import threading

    status = 0
    try:
        run()
    except SystemExit as stop:
        if stop.code is None:
            status = 0
        elif isinstance(stop.code, int):
            status = stop.code
        else:
            print(stop.code, file=sys.stderr)
            status = 1
    except BaseException:  # noqa: BLE001 - what the interpreter does with an uncaught exception
        sys.excepthook(*sys.exc_info())
        status = 1
    threading._shutdown()  # what Py_FinalizeEx does first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    results_folder = Path(sys.argv[2])
    child = _fork_each(json.loads(Path(sys.argv[1]).read_text()), results_folder)
    if child is None:
        sys.exit(0)
    # The child: from here on, the console script's process.
    import runpy

    os.chdir(child["cwd"])
    for fd, suffix in ((1, "stdout"), (2, "stderr")):
        target = os.open(results_folder / f"{child['index']}.{suffix}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    if len(child["command"]) == 1:  # genlab ...: the console script
        script = child["command"][0]
        sys.argv = [script, *child["args"]]
        sys.path[0] = os.path.dirname(os.path.realpath(script))
        _exit_as_the_interpreter_would(lambda: runpy.run_path(script, run_name="__main__"))
    else:  # python -m <module> ...
        module = child["command"][2]
        sys.modules.pop(module, None)
        sys.argv = [module, *child["args"]]  # run_module puts the module's file first, as python -m does
        sys.path[0] = os.getcwd()
        _exit_as_the_interpreter_would(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True))
