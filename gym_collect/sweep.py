"""Hydra multirun sweeps under any launcher: each job's exit code back to the command, and shards merged.

    submitting process                                  each job (same process, subprocess, Slurm, Ray)
    on_multirun_start: remember the sweep folder        task function -> exit code (Hydra's JobReturn)
                                                        on_job_end: write <job dir>/gym_collect_job.json
    on_multirun_end (or the entry point, when the launcher raised because a job died):
        read every gym_collect_job.json under the sweep folder
        exit code = the highest job exit code (1 when the launcher lost a job)
        shards (num_shards=N 'shard_id=range(N)'): all finished -> merge_rollouts into output_jsonl_fpath
                                                  else          -> nothing merged; which shards to rerun

Why a file and not `JobReturn`: launchers hand `JobReturn`s to the sweeper, and Hydra's `_run_hydra`
(hydra/_internal/utils.py) drops what the sweep returns, so no callback or entry point sees them. Each job
writes its code beside its `.hydra/` folder instead; the sweep folder must be visible to the submitting
process (a shared file system on Slurm or a Ray cluster, as the shard outputs are). Callback hooks follow
hydra/experimental/callback.py (Hydra 1.3); `on_job_end` runs where the job runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gym_collect.errors import GymCollectError

log = logging.getLogger("gym_collect.sweep")

JOB_FILE = "gym_collect_job.json"
JOB_SCHEMA = "gym_collect.job/1"
EXIT_LOST = 1  # a job that left no exit code: it could not start, or was killed
FINISHED = (0, 3)  # exit codes of a shard that accounted for every rollout (3: some failed for good)


@dataclass(frozen=True)
class JobResult:
    """What one job of a sweep left in `<job dir>/gym_collect_job.json`: its exit code, its task overrides
    (as Hydra recorded them: secrets are `${oc.env:...}` references), and for a shard, the configured
    output (absolute) with `num_shards`/`shard_id`."""

    exit_code: int
    overrides: tuple[str, ...]
    output: str | None
    num_shards: int | None
    shard_id: int | None
    job_dir: str

    @classmethod
    def read(cls, path: Path) -> JobResult | None:
        """Parse one job file; None (with a warning) when it is unreadable or of another schema."""
        try:
            doc = orjson.loads(path.read_bytes())
            if doc.get("schema") != JOB_SCHEMA:
                raise ValueError(f"schema {doc.get('schema')!r}")
            return cls(int(doc["exit_code"]), tuple(doc["overrides"]), doc.get("output"), doc.get("num_shards"),
                       doc.get("shard_id"), str(path.parent))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s: unreadable job result (%s); counting that job as lost", path, exc)
            return None


def exit_code_of(job_return: JobReturn) -> int:
    """The task function's exit code; `EXIT_LOST` when it raised or returned something else."""
    value = job_return._return_value if job_return.status == JobStatus.COMPLETED else None
    return value if isinstance(value, int) and not isinstance(value, bool) else EXIT_LOST


class SweepCallback(Callback):
    """Hydra callback (`hydra.callbacks.gym_collect`) that carries job exit codes across launchers and
    merges shard sweeps; see the module docstring."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        for stale in _job_files(sweep_dir):  # a sweep folder reused by a rerun: only this sweep's codes count
            stale.unlink(missing_ok=True)
        Sweep.current = Sweep(sweep_dir, tuple(OmegaConf.to_container(config.hydra.overrides.task)))  # type: ignore[arg-type]

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        job_dir = Path(str(config.hydra.runtime.output_dir))
        doc = {"schema": JOB_SCHEMA, "exit_code": exit_code_of(job_return),
               "overrides": list(job_return.overrides or ()), **_shard_fields(config)}
        tmp = job_dir / f".{JOB_FILE}.{os.getpid()}.tmp"
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
            os.replace(tmp, job_dir / JOB_FILE)
        except OSError as exc:
            log.error("cannot record this job's exit code in %s (%s); the sweep will count it as lost", job_dir, exc)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if Sweep.current is not None:
            Sweep.current.finish(launcher_failed=False)


class Sweep:
    """One multirun in the submitting process: reads the jobs' results when it ends, merges shard sets, and
    holds the exit code for the entry point (`code`, None until `finish` ran)."""

    current: Sweep | None = None

    def __init__(self, sweep_dir: Path, overrides: tuple[str, ...]) -> None:
        self.sweep_dir = sweep_dir
        self.overrides = overrides
        self.code: int | None = None

    def finish(self, *, launcher_failed: bool) -> int:
        """Collect the jobs' exit codes and merge complete shard sets; returns (and keeps) the sweep's code.

        `launcher_failed`: the launcher raised (a job died or could not start), so jobs may be missing."""
        if self.code is not None:
            return self.code
        results = [r for r in map(JobResult.read, _job_files(self.sweep_dir)) if r is not None]
        codes = [r.exit_code for r in results]
        code = max([*codes, EXIT_LOST if launcher_failed or not results else 0])
        if launcher_failed:
            log.error("the launcher lost a job (it was killed, or could not start): see the error above and the "
                      "job logs under %s; %d jobs reported an exit code", self.sweep_dir, len(results))
        elif not results:
            log.error("no job of this sweep reported an exit code under %s", self.sweep_dir)
        for (output, num_shards), shards in _shard_sets(results).items():
            code = max(code, self._merge_or_explain(Path(output), num_shards, shards, launcher_failed))
        summary = ", ".join(f"{_job_name(r)}: {r.exit_code}" for r in sorted(results, key=_job_order))
        log.info("Sweep ended with exit code %d (%s)", code, summary or "no job reported")
        self.code = code
        return code

    def _merge_or_explain(self, output: Path, num_shards: int, shards: Sequence[JobResult],
                          launcher_failed: bool) -> int:
        from gym_collect.collect import shard_output_path
        from gym_collect.merge import merge_rollouts

        by_id = {r.shard_id: r for r in shards if r.shard_id is not None}
        unfinished = sorted(k for k, r in by_id.items() if r.exit_code not in FINISHED)
        if launcher_failed:
            unfinished = sorted(set(unfinished) | (set(range(num_shards)) - set(by_id)))
        if unfinished:
            detail = ", ".join(f"{k} ({'exit ' + str(by_id[k].exit_code) if k in by_id else 'no exit code'})"
                               for k in unfinished)
            log.error("Nothing merged into %s: shards %s of %d did not finish. Rerun the same command with "
                      "resume=true (finished shards only check their output), or only those shards with "
                      "'shard_id=%s' resume=true", output, detail, num_shards, ",".join(map(str, unfinished)))
            return 0
        paths = [shard_output_path(output, num_shards, k) for k in range(num_shards)]
        try:
            check = merge_rollouts(paths, output)
        except GymCollectError as exc:
            log.error("Nothing merged into %s: %s", output, exc)
            log.error("Rerun the shards named above with resume=true, then the merge happens as that sweep ends "
                      "(or run merge_rollouts -o %s %s)", output, " ".join(map(str, paths)))
            return exc.exit_code
        log.info("Merged %s into %s (with %s and %s)", check.describe(), output,
                 output.with_name(output.stem + "_metrics.json").name,
                 output.with_name(output.stem + "_failures.jsonl").name if check.failed else "no failures")
        return 0


def _job_files(sweep_dir: Path) -> list[Path]:
    if not sweep_dir.is_dir():
        return []
    return sorted(p for p in sweep_dir.rglob(JOB_FILE) if ".submitit" not in p.parts)


def _shard_fields(config: DictConfig) -> dict[str, Any]:
    """`output` (absolute), `num_shards` and `shard_id` of a job's config; None for what is unset or broken, and
    for a dry run (it writes no shard, so there is nothing to merge)."""
    if OmegaConf.select(config, "dry_run", default=False) is True:
        return {"output": None, "num_shards": None, "shard_id": None}
    fields: dict[str, Any] = {}
    for key in ("output_jsonl_fpath", "num_shards", "shard_id"):
        try:
            fields[key] = OmegaConf.select(config, key, default=None)
        except Exception:  # an interpolation that does not resolve: the job already failed on it
            fields[key] = None
    output = fields.pop("output_jsonl_fpath")
    fields["output"] = str(Path(str(output)).absolute()) if output else None
    for key in ("num_shards", "shard_id"):
        if not isinstance(fields[key], int) or isinstance(fields[key], bool):
            fields[key] = None
    return fields


def _shard_sets(results: Iterable[JobResult]) -> dict[tuple[str, int], list[JobResult]]:
    sets: dict[tuple[str, int], list[JobResult]] = {}
    for r in results:
        if r.output and r.num_shards is not None and r.shard_id is not None:
            sets.setdefault((r.output, r.num_shards), []).append(r)
    return sets


def _job_name(r: JobResult) -> str:
    return f"shard {r.shard_id}" if r.shard_id is not None else Path(r.job_dir).name


def _job_order(r: JobResult) -> tuple[int, str]:
    return (r.shard_id if r.shard_id is not None else -1, r.job_dir)
