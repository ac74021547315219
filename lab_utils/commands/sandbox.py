"""Where ``genlab grade`` runs a student's code: a bubblewrap sandbox (the sandbox Flatpak uses), or, only when the
instructor says so, a plain process.

The sandbox (``bwrap``) sees a read-only view of the system (``/usr``), of this Python (its prefix and the
environment's) and of genlab's own packages (mounted one by one: never the checkout they sit in, so never the
solution notebooks), a private ``/tmp`` and ``HOME``, and one writable folder: the submission's work folder. It has
its own user, process, network, IPC and UTS namespaces (no network, no other process, nothing outside to signal),
no ``/proc`` but the CPU's description (no process's environment or open files to read), a cleared environment, and it dies with the grader.
Limits (memory, file size, CPU time, processes) are resource limits set before it starts; the wall-clock limit is
the grader's.
"""

from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("genlab", "genlab_conf", "lab_utils", "labs")  # what the runner imports from genlab
INSIDE_PACKAGES = "/opt/genlab"  # where they appear in the sandbox
INSIDE_WORK = "/submission"


class SandboxUnavailable(Exception):
    """No sandbox can be made here (one line: what is missing and how to fix it)."""


@dataclass(frozen=True)
class Limits:
    memory_bytes: int = 6 * 2**30  # data segment and private mappings (a model and its batches fit in far less)
    file_bytes: int = 2**30  # largest file the notebook may write
    cpu_seconds: int = 3600  # CPU time over all threads (the wall-clock limit is the grader's)
    processes: int = 256  # on top of what the grader's user runs already

    def rlimits(self) -> list[tuple[int, tuple[int, int]]]:
        """``(resource, (soft, hard))`` pairs for ``resource.setrlimit`` in the child: worked out in the grader (the
        child of a threaded process should do as little as possible between fork and exec)."""
        out = [(resource.RLIMIT_DATA, (self.memory_bytes, self.memory_bytes)),
               (resource.RLIMIT_FSIZE, (self.file_bytes, self.file_bytes)),
               (resource.RLIMIT_CPU, (self.cpu_seconds, self.cpu_seconds)),
               (resource.RLIMIT_CORE, (0, 0))]
        running = _processes_of_this_user()
        if running is not None:
            out.append((resource.RLIMIT_NPROC, (running + self.processes, running + self.processes)))
        return out


def _processes_of_this_user() -> int | None:
    """Tasks (threads included: RLIMIT_NPROC counts them) of this user now, from /proc; None where unknown."""
    uid, count = os.getuid(), 0
    try:
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    if entry.stat().st_uid == uid:
                        count += len(os.listdir(f"/proc/{entry.name}/task"))
                except OSError:
                    continue
    except OSError:
        return None
    return count


def _package_dirs() -> dict[str, str]:
    dirs = {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise SandboxUnavailable(f"cannot find genlab's package {name!r} to show the sandbox; reinstall genlab")
        dirs[name] = os.path.realpath(list(spec.submodule_search_locations)[0])
    return dirs


def sandbox_environment(extra: dict[str, str], inside: bool) -> dict[str, str]:
    """The student's process's whole environment: nothing of the grader's but these."""
    home = "/tmp/home" if inside else extra.get("HOME", "/tmp")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8", "MPLBACKEND": "Agg",
           "MPLCONFIGDIR": f"{home}/.mpl", "GENLAB_CACHE": f"{home}/.cache/genlab", "PYTHONDONTWRITEBYTECODE": "1",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TQDM_DISABLE": "1"}
    env.update(extra)
    if inside:
        env["PYTHONPATH"] = INSIDE_PACKAGES
    return env


def bwrap_command(work: Path, argv: list[str], env: dict[str, str]) -> list[str]:
    """The ``bwrap`` command line that runs ``argv`` (paths as seen inside) in a sandbox around ``work``."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxUnavailable("bubblewrap (bwrap) is not installed: install it (Debian/Ubuntu: apt-get install "
                                 "bubblewrap) or pass --unsandboxed to grade without a sandbox (not for credit)")
    command = [bwrap, "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
               "--uid", "65534", "--gid", "65534", "--ro-bind", "/usr", "/usr", "--dev", "/dev",
               "--tmpfs", "/tmp", "--dir", "/tmp/home"]
    for name in ("bin", "lib", "lib64", "sbin", "lib32", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    # torch reads the CPU's features from these (without them it cannot convert float16 weights): the host's CPU
    # description only, never /proc itself (no process's files or environment)
    command += ["--ro-bind-try", "/proc/cpuinfo", "/proc/cpuinfo",
                "--ro-bind-try", "/sys/devices/system/cpu", "/sys/devices/system/cpu"]
    for path in ("/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf"):
        command += ["--ro-bind-try", path, path]
    # this Python where it really is, and also where it is named (a virtual environment reached by a symbolic link)
    paths = (sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)))
    mounts = {os.path.realpath(p): os.path.realpath(p) for p in paths}
    mounts.update({os.path.abspath(p): os.path.realpath(p) for p in paths})
    for inside in sorted(mounts):
        if not inside.startswith("/usr/"):
            command += ["--ro-bind", mounts[inside], inside]
    for name, folder in _package_dirs().items():
        command += ["--ro-bind", folder, f"{INSIDE_PACKAGES}/{name}"]
    command += ["--bind", str(work), INSIDE_WORK, "--chdir", INSIDE_WORK]
    for key, value in env.items():
        command += ["--setenv", key, value]
    return command + ["--"] + argv


def check_sandbox() -> None:
    """Raise :class:`SandboxUnavailable` (one line) unless a sandbox starts here."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="genlab-sandbox-check-") as folder:
        command = bwrap_command(Path(folder), [sys.executable, "-c", "print('ok')"], sandbox_environment({}, True))
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SandboxUnavailable(f"bubblewrap cannot start a sandbox here ({err}); pass --unsandboxed to grade "
                                     f"without one (not for credit)") from None
        if result.returncode != 0 or result.stdout.strip() != "ok":
            reason = (result.stderr.strip().splitlines() or ["no output"])[-1][:200]
            raise SandboxUnavailable(f"bubblewrap cannot start a sandbox here ({reason}); pass --unsandboxed to "
                                     f"grade without one (not for credit)")
