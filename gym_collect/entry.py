"""The console commands, with signals handled from their first instant.

Importing the commands' modules (Hydra, OmegaConf, aiohttp) takes about 0.6 s. A Ctrl-C, SIGTERM or SIGHUP in
that time would print a traceback from whatever import it hit, or kill the process without a word; here the
handlers are set before those imports, so it ends with one line and exit code 130, like a signal at any later
moment before a run starts.
"""

from __future__ import annotations

import importlib
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

EXIT_INTERRUPTED = 130  # as `gym_collect.shutdown.EXIT_INTERRUPTED`, which this module must not import


def collect_rollouts() -> Any:
    """`collect_rollouts KEY=VALUE ...` (`gym_collect.cli.main`)."""
    return _run("collect_rollouts", "gym_collect.cli")


def merge_rollouts() -> Any:
    """`merge_rollouts -o OUT SHARD ...` (`gym_collect.merge.main`)."""
    return _run("merge_rollouts", "gym_collect.merge")


def tune_parallelism() -> Any:
    """`tune_parallelism KEY=VALUE ...` (`gym_collect.tune.main`)."""
    return _run("tune_parallelism", "gym_collect.tune")


def _run(prog: str, module: str) -> Any:
    received: list[str] = []

    def interrupted(signum: int, frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        raise KeyboardInterrupt(received[0])

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    try:
        main: Callable[[], Any] = importlib.import_module(module).main
    except BaseException:  # a library may turn the interrupt into an error of its own (OmegaConf does)
        if not received:
            raise
        print(f"{prog}: interrupted ({received[0]}) before the run started", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the command's own handling takes over from here
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    return main()
