"""The files of a run, named from the output's stem, and the check that none of them is a file the run reads."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from gym_collect.errors import ConfigError, OutputError


@dataclass(frozen=True)
class OutputPaths:
    """The files of a run, named from the output's stem: `rollouts.jsonl` -> `rollouts_failures.jsonl`..."""

    output: Path

    def _beside(self, suffix: str) -> Path:
        return self.output.with_name(self.output.stem + suffix)

    @property
    def failures(self) -> Path:
        """Rollouts that failed for good, one JSON object a line."""
        return self._beside("_failures.jsonl")

    @property
    def metrics(self) -> Path:
        """Counts, throughput, latency and field statistics, written at the end."""
        return self._beside("_metrics.json")

    @property
    def manifest(self) -> Path:
        """What defines the run, checked on resume."""
        return self._beside("_run.json")

    @property
    def status(self) -> Path:
        """Live progress, rewritten every few seconds."""
        return self._beside("_status.json")

    @property
    def materialized_inputs(self) -> Path:
        """Every `/run` body of the run in (task, rollout) order, written before dispatch (NeMo Gym 0.7's
        `<stem>_materialized_inputs.jsonl`, `nemo_gym/path_utils.py:22-24`)."""
        return self._beside("_materialized_inputs.jsonl")

    @property
    def aggregate_metrics(self) -> Path:
        """What `/aggregate_metrics` returned per environment server (NeMo Gym 0.7's
        `<stem>_aggregate_metrics.json`, `nemo_gym/path_utils.py:27-33`)."""
        return self._beside("_aggregate_metrics.json")

    @property
    def lock(self) -> Path:
        """Held for the whole run, so that one run at a time owns the output."""
        return self._beside("_run.lock")

    @property
    def written(self) -> tuple[Path, ...]:
        """Every path a run may create, append to, truncate, replace or unlink."""
        return (self.output, self.failures, self.materialized_inputs, self.aggregate_metrics, self.metrics,
                self.manifest, self.status, self.lock)


def followed(output: Path) -> Path:
    """The file an output path stands for: the target of a symbolic link (so that the link and its target
    share one lock and one set of side files), else the path itself."""
    return output.resolve() if output.is_symlink() else output


def check_input_file(path: Path) -> os.stat_result:
    """Stat the input and insist on a regular file: the run reads it twice (a check pass, then dispatch) and
    resume reads it again, which a FIFO, `/dev/stdin` or a process substitution cannot give.

    Raises `ConfigError` naming the path and what to do.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: input file not found; check input_jsonl_fpath") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the input file ({exc.strerror})") from exc
    if stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path}: input_jsonl_fpath is a directory; pass the JSONL file inside it")
    if not stat.S_ISREG(info.st_mode):
        raise ConfigError(
            f"{path}: input_jsonl_fpath is not a regular file (a pipe or device): the input is read twice and "
            "again on resume; save it to a file first (e.g. `cat ... > prompts.jsonl`)"
        )
    return info


def check_output_paths(paths: OutputPaths, reads: list[Path]) -> None:
    """Refuse a run whose written files include a file it reads, or whose output is not a file path.

    Two paths are the same file when their resolved paths are equal or `os.path.samefile` says so (links,
    bind mounts). Raises `ConfigError` naming both and what to do.
    """
    if paths.output.is_dir():
        raise ConfigError(
            f"{paths.output}: output_jsonl_fpath is a directory; pass a file path such as "
            f"{paths.output / 'rollouts.jsonl'}"
        )
    owner = side_file_owner(paths.output)
    if owner is not None:
        raise ConfigError(f"{paths.output}: output_jsonl_fpath is a side file of the run that writes {owner}; "
                          "choose another output_jsonl_fpath")
    for written in paths.written:
        kind = not_a_file(written)
        if kind is not None:
            which = "output_jsonl_fpath" if written == paths.output else f"side file {written.name} of the output"
            raise ConfigError(f"{written}: {which} is {kind}, which a run would remove or replace: move it away "
                              "or choose another output_jsonl_fpath")
        for read in reads:
            if _same_file(written, read):
                which = "output_jsonl_fpath" if written == paths.output else f"the side file {written.name}"
                raise ConfigError(
                    f"{read}: the input would be overwritten: it is {which} of output {paths.output}; "
                    "choose another output_jsonl_fpath"
                )


# what each side file adds to the output's stem (`r` -> `r_failures.jsonl`...), from `OutputPaths` itself
SIDE_SUFFIXES = tuple(p.name[1:] for p in OutputPaths(Path("r.jsonl")).written[1:])


def side_file_owner(path: Path) -> Path | None:
    """The output whose side file `path` is (`r_failures.jsonl` of `r.jsonl`...), when that run is there (its
    manifest or its lock beside it); else None."""
    for suffix in SIDE_SUFFIXES:
        if path.name.endswith(suffix) and len(path.name) > len(suffix):
            stem = path.name[: -len(suffix)]
            if any((path.parent / (stem + mark)).exists() for mark in ("_run.json", "_run.lock")):
                return path.with_name(stem + ".jsonl")
    return None


def not_a_file(path: Path) -> str | None:
    """What `path` is when it exists and is not a regular file (links followed): "a directory", "a device",
    "a pipe" or "a socket"; None for a regular file or nothing."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a pipe"
    return "a socket" if stat.S_ISSOCK(mode) else "a device"


def check_output_folder(paths: OutputPaths) -> None:
    """Refuse an output whose folder exists as a file; raises `OutputError`."""
    for parent in paths.output.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"{parent}: is a file, so {paths.output} cannot be created; choose another path")
            return


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
