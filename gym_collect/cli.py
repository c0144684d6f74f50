"""The Hydra entry points of `collect_rollouts` and `tune_parallelism`; with `sweep.py`, the only modules that
see a `DictConfig`.

Before Hydra parses the command line, `gym_collect.overrides` checks every key (a misspelled one is an
error naming the closest valid key; Hydra's flags, config groups and `hydra.*` keys pass) and moves literal
secrets into environment variables. The primary config `collect_rollouts` is the schema plus Hydra settings:
`hydra.job.name` (the name of log files and Slurm jobs) and the `gym_collect.sweep.SweepCallback` callback,
which brings each job's exit code back from any launcher and merges shard sweeps.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gym_collect.collect import run_collect
from gym_collect.config import CollectConfig
from gym_collect.errors import ConfigError, GymCollectError
from gym_collect.nemo.env_yaml import find_env_yaml, head_server_overrides
from gym_collect.overrides import (
    HYDRA_COMPLETION_FLAGS,
    OVERRIDE,
    HiddenSecrets,
    hide_secrets,
    normalize_overrides,
)
from gym_collect.redact import REDACTED, userinfo_span
from gym_collect.shutdown import EXIT_INTERRUPTED, install_process_handlers, note_signal, received_earlier
from gym_collect.sweep import Sweep

__all__ = ["CONFIG_NAME", "dry_run_overrides", "hydra_command", "main", "normalize_overrides", "to_config"]

log = logging.getLogger("gym_collect")

CONFIG_NAME = "collect_rollouts"
SCHEMA_NAME = "collect_rollouts_schema"
SWEEP_CALLBACK = "gym_collect.sweep.SweepCallback"

ConfigStore.instance().store(name=SCHEMA_NAME, node=CollectConfig)
ConfigStore.instance().store(name=CONFIG_NAME, node={
    "defaults": [SCHEMA_NAME, "_self_"],
    "hydra": {"job": {"name": CONFIG_NAME}, "callbacks": {"gym_collect": {"_target_": SWEEP_CALLBACK}}},
})


TRUE_WORDS = ("true", "yes", "y", "on", "1")  # what OmegaConf reads as true for a bool field


def dry_run_overrides(args: Sequence[str]) -> tuple[list[str], str | None]:
    """With `dry_run=true` (any spelling OmegaConf reads as true), Hydra's overrides that keep it from writing a
    run folder, saved configs or a log file (a dry run writes nothing) and run every job here, in the foreground,
    whatever launcher a preset names (a dry run submits nothing), and the temporary folder a multirun's job exit
    codes go to (the caller removes it); else `([], None)`."""
    for arg in args:
        match = OVERRIDE.match(arg)
        value = (match["rest"] or "")[1:].strip("'\"").lower() if match else ""
        if match and match["key"] == "dry_run" and value in TRUE_WORDS:
            sweep_dir = tempfile.mkdtemp(prefix="gym_collect_dry_run_")
            return (["hydra.output_subdir=null", "hydra.run.dir=.", f"hydra.sweep.dir={sweep_dir}",
                     "hydra/job_logging=stdout", "hydra/launcher=basic"], sweep_dir)
    return [], None


def to_config(cfg: DictConfig) -> CollectConfig:
    """Convert Hydra's config to the typed schema once, here; raises `ConfigError` on a bad value."""
    try:
        obj = OmegaConf.to_object(cfg)
    except GymCollectError:
        raise
    except Exception as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, GymCollectError) else None
        if cause is not None:
            raise cause from None
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]  # OmegaConf adds full_key, types...
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"bad configuration{f' at {key}' if key else ''}: {first}") from exc
    assert isinstance(obj, CollectConfig)
    return obj


def redact_saved_config(cfg: DictConfig) -> None:
    """Replace literal secrets in Hydra's saved `.hydra/*.yaml` of this job with `<redacted>`: `headers`
    values and URL userinfo (`agent_url`, `head_server_url`, `agents`) written literally in a config file.

    Secrets given on the command line never get there (see `gym_collect.overrides`); interpolations such as
    `${oc.env:AGENT_TOKEN}` are saved unresolved by Hydra and are left alone.
    """
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return
    if hydra_cfg.output_subdir is None:
        return
    secrets = _literal_secrets(cfg)
    if not secrets:
        return
    folder = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir
    for path in folder.glob("*.yaml"):
        text = path.read_text()
        redacted = text
        for secret in secrets:
            redacted = redacted.replace(secret, REDACTED)
        if redacted != text:
            path.write_text(redacted)


def _literal_secrets(cfg: DictConfig) -> list[str]:
    raw: Any = OmegaConf.to_container(cfg, resolve=False)
    headers = raw.get("headers") or {}
    secrets = [v for v in headers.values() if isinstance(v, str) and v and "${" not in v]
    urls = [raw.get("agent_url"), raw.get("head_server_url"), *(raw.get("agents") or {}).values()]
    for url in urls:
        span = userinfo_span(url) if isinstance(url, str) and "${" not in url else None
        if span is not None:
            secrets.append(url[span[0]:span[1]])
    return secrets


class _RedactingStream(io.TextIOBase):
    """A text stream that writes to `stream` with every secret replaced by `<redacted>` (console lines of
    this process: `--cfg ... --resolve`, Hydra's error reports, logging handlers made while it is set)."""

    def __init__(self, stream: TextIO, hidden: HiddenSecrets) -> None:
        super().__init__()
        self._stream, self._hidden = stream, hidden

    def write(self, text: str) -> int:
        self._stream.write(self._hidden.redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream, "encoding", "utf-8")


@contextmanager
def _redacted_console(hidden: HiddenSecrets) -> Iterator[None]:
    if not hidden.values:
        yield
        return
    saved = sys.stdout, sys.stderr
    sys.stdout = _RedactingStream(saved[0], hidden)
    sys.stderr = _RedactingStream(saved[1], hidden)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


COMMAND_ARGS: list[str] = []  # the command line as the user gave it (secrets redacted), for messages


def hydra_command(prog: str, job: Callable[[CollectConfig], int]) -> Callable[[], None]:
    """A console entry point: check the overrides, hide literal secrets, take the head server from NeMo Gym's
    `env.yaml` when there is one (`gym_collect.nemo.env_yaml`), let Hydra compose the config and
    run `job(typed_config)` for each job (several with `-m`, under any Hydra launcher), and exit with the
    highest exit code (from `gym_collect.sweep` for a multirun); a `GymCollectError` becomes one logged line
    and its exit code. `prog` is also `hydra.job.name`."""
    codes: list[int] = []

    def task(cfg: DictConfig) -> int:
        redact_saved_config(cfg)
        if (earlier := received_earlier()) is not None:  # one Ctrl-C stops a whole sweep, not just its job
            log.error("Not started: %s interrupted an earlier job of this sweep; rerun the command with resume=true",
                      earlier)
            code = EXIT_INTERRUPTED
        else:
            try:
                code = job(to_config(cfg))
            except GymCollectError as exc:
                log.error("%s", exc)
                code = exc.exit_code
        codes.append(code)
        return code  # Hydra's JobReturn.return_value: what a sweeper sees

    def entry_point() -> None:
        install_process_handlers()
        try:
            args = normalize_overrides(sys.argv[1:])
            hidden = hide_secrets(args)
            completion = any(a in HYDRA_COMPLETION_FLAGS for a in args)
            env_yaml = None if completion else find_env_yaml()
            pinned = head_server_overrides(env_yaml) if env_yaml is not None else []  # before args: they win
        except ConfigError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        hidden.export()
        COMMAND_ARGS[:] = [hidden.redact(arg) for arg in sys.argv[1:]]
        named = prog == CONFIG_NAME or completion or any(a.lstrip("+").startswith("hydra.job.name=") for a in args)
        dry_run, scratch = dry_run_overrides(args)
        sys.argv = [sys.argv[0], *([] if named else [f"hydra.job.name={prog}"]), *pinned, *hidden.args, *dry_run]
        Sweep.current = None
        hydra_exit = 0
        interrupted = False
        full_error = os.environ.get("HYDRA_FULL_ERROR")
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing a trace: reported below
        with _redacted_console(hidden):
            try:
                hydra.main(config_path=None, config_name=CONFIG_NAME, version_base="1.3")(task)()
            except SystemExit as exc:  # Hydra's own exits (--help: 0)
                hydra_exit = exc.code if isinstance(exc.code, int) else 1
            except KeyboardInterrupt as exc:  # a signal outside a job's own handling
                note_signal(str(exc) or "SIGINT")
                interrupted, hydra_exit = True, EXIT_INTERRUPTED
                if not codes and Sweep.current is None:
                    print(f"{prog}: interrupted ({str(exc) or 'SIGINT'}) before the run started", file=sys.stderr)
            except Exception as exc:  # composition errors, a launcher that lost a job, an unexpected error
                if full_error == "1":
                    raise
                usage = isinstance(exc, ValueError) and "can be specified" in str(exc)  # "Only one of --run..."
                print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
                hydra_exit = ConfigError.exit_code if usage else 1
            finally:
                _restore_env("HYDRA_FULL_ERROR", full_error)
            sweep = Sweep.current
            if sweep is not None:
                ended = sweep.code is not None  # on_multirun_end ran: every job had returned
                code = sweep.finish(launcher_failed=hydra_exit != 0)
                if hydra_exit and not ended:
                    code = max(code, hydra_exit if interrupted else 1)
            elif interrupted and codes:  # a signal after the run ended does not change its exit code
                code = max(codes)
            else:
                code = max([*codes, hydra_exit])
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        sys.exit(code)

    return entry_point


def _one_line(exc: BaseException) -> str:
    """Hydra's and OmegaConf's own messages as they are (they say what to change); anything else as its
    type and first line."""
    if isinstance(exc, HydraException | OmegaConfBaseException):
        cause = exc.__cause__
        detail = f": {(str(cause).strip().splitlines() or [''])[0]}" if cause is not None else ""
        return str(exc).strip() + detail
    if isinstance(exc, ValueError) and "can be specified" in str(exc):
        return str(exc)
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first} (HYDRA_FULL_ERROR=1 shows the stack trace)"


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextmanager
def _drain_before_requeue() -> Iterator[list[int]]:
    """Under submitit on Slurm, turn its pre-timeout signal (USR2, `signal_delay_s` before the time limit)
    into a clean stop, and requeue only after it.

    submitit's USR2 handler (submitit/core/job_environment.py, `SignalHandler.checkpoint_and_try_requeue`)
    requeues the job and exits at once, wherever the collection is. Here USR2 becomes a SIGTERM to this
    process (dispatch stops, in-flight rollouts get `shutdown_grace_s`, the metrics are written), and
    submitit's handler runs when the collection has ended with rollouts left to do. Yields the list that
    receives the signal number (empty when none came). Elsewhere (no submitit, or not on Slurm) it does
    nothing.
    """
    received: list[int] = []
    original = signal.getsignal(signal.SIGUSR2)
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or not callable(original):
        yield received
        return

    def on_usr2(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        log.warning("Slurm's time limit is near (%s): stopping cleanly, then requeueing",
                    signal.Signals(signum).name)
        os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGUSR2, on_usr2)
    try:
        yield received
    finally:
        signal.signal(signal.SIGUSR2, original)


def _collect_job(cfg: CollectConfig) -> int:
    with _drain_before_requeue() as received:
        code = run_collect(cfg)
    if received and code == EXIT_INTERRUPTED:
        handler = signal.getsignal(signal.SIGUSR2)
        if callable(handler):
            handler(received[0], None)  # submitit: requeue this job (resume=true continues it), then exit
    return code


main = hydra_command("collect_rollouts", _collect_job)
"""Console entry point: `collect_rollouts KEY=VALUE ...` (Hydra overrides)."""

if __name__ == "__main__":
    main()
