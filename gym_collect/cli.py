"""The Hydra entry point of `collect_rollouts`; the only module that sees a `DictConfig`.

Before Hydra parses the command line, every override is checked against the schema: a misspelled key is an
error naming it and the closest valid key (NeMo Gym silently ignores it), and NeMo Gym's `+key=value`
spelling is accepted for every key (rewritten to Hydra's add-or-override `++key=value`).
"""

from __future__ import annotations

import difflib
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from gym_collect.collect import run_collect
from gym_collect.config import CollectConfig, config_keys, open_keys
from gym_collect.errors import ConfigError, GymCollectError
from gym_collect.shutdown import EXIT_INTERRUPTED, install_process_handlers

log = logging.getLogger("gym_collect")

CONFIG_NAME = "collect_rollouts"
HYDRA_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                          "--config-dir", "-cd", "--experimental-rerun"}
OVERRIDE = re.compile(r"^(?P<prefix>\+{0,2}|~)(?P<key>[A-Za-z_][\w.\-/@]*)(?P<rest>=.*)?$", re.DOTALL)
REDACTED = "<redacted>"

ConfigStore.instance().store(name=CONFIG_NAME, node=CollectConfig)


def normalize_overrides(args: Sequence[str], schema: type = CollectConfig) -> list[str]:
    """Check each `key=value` override against the schema and accept NeMo Gym's `+key=value`.

    Returns the arguments with `+key` rewritten to `++key`; Hydra flags and `hydra.*` keys pass through.
    Raises `ConfigError` naming an unknown key and the closest valid one.
    """
    valid = config_keys(schema)
    open_ = open_keys(schema)
    out: list[str] = []
    skip_next = False
    for arg in args:
        if skip_next or arg.startswith("-"):
            skip_next = arg in HYDRA_FLAGS_WITH_VALUE
            out.append(arg)
            continue
        match = OVERRIDE.match(arg)
        if match is None:
            out.append(arg)
            continue
        key = match["key"]
        top = key.split(".", 1)[0]
        if top != "hydra" and key not in valid and top not in open_:
            close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `collect_rollouts --help` for the keys"
            raise ConfigError(f"unknown config key {key!r} in {arg.split('=', 1)[0]!r}{hint}")
        if match["prefix"] == "+" or (match["prefix"] == "" and top in open_ and key != top):
            arg = "++" + arg.lstrip("+")  # add-or-override: valid whether or not the key exists yet
        out.append(arg)
    return out


def dry_run_overrides(args: Sequence[str]) -> list[str]:
    """With `dry_run=true`, Hydra's overrides that keep it from writing a run folder, saved configs or a log
    file (a dry run writes nothing)."""
    for arg in args:
        match = OVERRIDE.match(arg)
        if match and match["key"] == "dry_run" and (match["rest"] or "").lower() in ("=true", "=1", "=yes"):
            return ["hydra.output_subdir=null", "hydra.run.dir=.", "hydra/job_logging=stdout"]
    return []


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
        raise ConfigError(f"bad configuration: {exc}") from exc
    assert isinstance(obj, CollectConfig)
    return obj


def redact_saved_config(cfg: DictConfig) -> None:
    """Replace literal `headers` values in Hydra's saved `.hydra/*.yaml` with `<redacted>`.

    Interpolations such as `${oc.env:AGENT_TOKEN}` are saved unresolved by Hydra and are left alone.
    """
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:
        return
    if hydra_cfg.output_subdir is None:
        return
    secrets = [v for v in OmegaConf.to_container(cfg.headers, resolve=False).values()  # type: ignore[union-attr]
               if isinstance(v, str) and v and "${" not in v]
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


def hydra_command(prog: str, job: Callable[[CollectConfig], int]) -> Callable[[], None]:
    """A console entry point that checks the overrides, lets Hydra compose the config, runs
    `job(typed_config)` for each job (several with `-m`), and exits with the highest exit code; a
    `GymCollectError` becomes one logged line and its exit code."""
    codes: list[int] = []

    def task(cfg: DictConfig) -> None:
        redact_saved_config(cfg)
        try:
            codes.append(job(to_config(cfg)))
        except GymCollectError as exc:
            log.error("%s", exc)
            codes.append(exc.exit_code)

    def entry_point() -> None:
        install_process_handlers()
        try:
            args = normalize_overrides(sys.argv[1:])
        except ConfigError as exc:
            print(f"{prog}: error: {exc}", file=sys.stderr)
            sys.exit(exc.exit_code)
        sys.argv = [sys.argv[0], *args, *dry_run_overrides(args)]
        try:
            hydra.main(config_path=None, config_name=CONFIG_NAME, version_base="1.3")(task)()
        except KeyboardInterrupt as exc:  # a signal outside a job's own handling
            if not codes:
                print(f"{prog}: interrupted ({exc or 'SIGINT'}) before the run started", file=sys.stderr)
                sys.exit(EXIT_INTERRUPTED)
        sys.exit(max(codes, default=0))

    return entry_point


def _collect_job(cfg: CollectConfig) -> int:
    return run_collect(cfg)


main = hydra_command("collect_rollouts", _collect_job)
"""Console entry point: `collect_rollouts KEY=VALUE ...` (Hydra overrides)."""

if __name__ == "__main__":
    main()
