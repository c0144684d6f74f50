"""Run one command as its own process group and guarantee that the whole group ends (Linux, standard library only).

    python supervisor.py --max-lifetime-s 1800 --grace-s 20 --log stack.log -- gym env start ...

Why a separate process: NeMo Gym's `gym env start` spawns one shell and one Python per server and stops them only
on `KeyboardInterrupt`. A non-interactive shell starts background jobs with SIGINT ignored, which survives `exec`,
so the command is started with SIGINT restored to the default, in a session of its own (`setsid`), which makes it
and every server it spawns one process group.

The supervisor prints the command's pid on stdout, then waits (`select`, no polling) for the first of:
- EOF or any line on its stdin: the owner asks it to stop, or the owner died and the pipe closed;
- SIGINT, SIGTERM or SIGHUP to the supervisor;
- the command exiting by itself;
- `--max-lifetime-s` elapsing (a watchdog, so nothing outlives a hung or killed test session).
Then it sends SIGINT to the command (NeMo Gym then stops its servers), waits up to `--grace-s`, and SIGKILLs whatever
is left of the process group. It is a child subreaper, so orphaned servers are reparented to it and reaped before it
exits. Exit status: the command's, or 1 when the command had to be killed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


class _Stop(Exception):
    """Raised from a signal handler to leave `select`."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _wait_exit(pidfd: int, timeout_s: float) -> bool:
    """Wait up to `timeout_s` for the process behind `pidfd` to exit; True when it has."""
    readable, _, _ = select.select([pidfd], [], [], max(0.0, timeout_s))
    return bool(readable)


def _reap_all(deadline_s: float) -> None:
    """Reap every child (including reparented orphans), giving up after `deadline_s` seconds."""
    signal.signal(signal.SIGALRM, _on_signal)
    signal.setitimer(signal.ITIMER_REAL, max(0.01, deadline_s))
    try:
        while True:
            os.wait()
    except (ChildProcessError, _Stop):
        pass
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def main(argv: list[str]) -> int:
    """Run `argv` (after `--`) under supervision; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-lifetime-s", type=float, required=True)
    parser.add_argument("--grace-s", type=float, default=20.0)
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--cwd", type=Path, default=None)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    started = time.monotonic()
    # The child inherits the disposition at fork; SIG_DFL survives exec, SIG_IGN would too.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    with args.log.open("ab") as log:
        child = subprocess.Popen(command, cwd=args.cwd, stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    pidfd = os.pidfd_open(child.pid)
    print(child.pid, flush=True)

    reason = "deadline"
    try:
        remaining = args.max_lifetime_s - (time.monotonic() - started)
        readable, _, _ = select.select([sys.stdin, pidfd], [], [], max(0.0, remaining))
        if pidfd in readable:
            reason = "exited"
        elif readable:
            reason = "asked"
    except _Stop as stop:
        reason = f"signal {stop}"

    killed = False
    if reason != "exited":
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGINT)
        if not _wait_exit(pidfd, args.grace_s):
            killed = True
    # The child is not reaped yet, so its pid (the group id) cannot have been reused.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    code = child.wait()
    _reap_all(args.grace_s)
    print(f"supervisor: {reason}; command exited {code}", file=sys.stderr, flush=True)
    return 1 if killed else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
