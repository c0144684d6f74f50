"""The NeMo Gym 0.7.0 virtual environment the conformance suite runs the real servers and collector from.

NeMo Gym 0.7.0 declares `Requires-Python >=3.13.14` but runs on 3.11; letting pip resolve its dependencies for 3.11
fails, so the venv gets the pinned, 3.11-resolved lock file beside this module first and then the wheel itself with
`--no-deps --ignore-requires-python`. A stamp file records what was installed, so a second call costs one `stat` and
one file read; a venv with a different stamp (lock file edited, half-finished install) is rebuilt from scratch.

Run `python -m tests.nemo_gym.venv` to build it ahead of the tests (CI does, to keep install time out of the tests'
timeouts). Source of the recipe: NeMo Gym's README (install) and its `pyproject.toml` (dependencies).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
REQUIREMENTS = HERE / "requirements-py311-nemo-gym-0.7.0.txt"
NEMO_GYM_VERSION = "0.7.0"
# Git-ignored; NEMO_GYM_VENV moves it (a cache directory in CI, for example).
DEFAULT_VENV = REPO / ".nemo-gym-venv"
STAMP_NAME = "gym-collect-conformance.stamp"
# Whole install (about 160 packages) on a 2-core machine with a warm pip cache takes about 2 minutes; cold, more.
INSTALL_TIMEOUT_S = 1800.0


class VenvError(RuntimeError):
    """The NeMo Gym venv could not be created; the message names the failed command and its log."""


def venv_dir() -> Path:
    """Where the NeMo Gym venv lives: `$NEMO_GYM_VENV`, else `<repo>/.nemo-gym-venv`."""
    return Path(os.environ.get("NEMO_GYM_VENV") or DEFAULT_VENV).resolve()


def _stamp() -> str:
    """What a ready venv holds: the NeMo Gym version, the lock file's SHA-256 and the interpreter's version."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    return f"nemo-gym=={NEMO_GYM_VERSION}\nrequirements-sha256={digest}\npython={sys.version_info[:2]}\n"


def _run(cmd: list[str], log: Path) -> None:
    """Run one install step, appending its output to `log`; raise `VenvError` naming the step when it fails."""
    with log.open("ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise VenvError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}; see {log}")


def ensure_venv(path: Path | None = None) -> Path:
    """Create the NeMo Gym venv at `path` (default `venv_dir()`) unless a ready one is there; return its directory.

    Idempotent: a venv whose stamp matches is returned as is. Otherwise the directory is removed and built again
    (`python3.11 -m venv`, the lock file, then `nemo-gym==0.7.0` without dependencies); the stamp is written last,
    so an interrupted install is redone next time. Needs the package index (pip's own configuration applies).

    Raises:
        VenvError: an install step failed (the message points at `<venv>.install.log`).
    """
    path = (path or venv_dir()).resolve()
    stamp = path / STAMP_NAME
    if stamp.is_file() and stamp.read_text() == _stamp() and (path / "bin" / "gym").exists():
        return path
    if path.exists():
        shutil.rmtree(path)
    log = path.with_name(path.name + ".install.log")
    log.unlink(missing_ok=True)
    _run([sys.executable, "-m", "venv", str(path)], log)
    pip = [str(path / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "install", "-q"]
    _run([*pip, "-r", str(REQUIREMENTS)], log)
    _run([*pip, "--no-deps", "--ignore-requires-python", f"nemo-gym=={NEMO_GYM_VERSION}"], log)
    stamp.write_text(_stamp())
    return path


if __name__ == "__main__":
    print(ensure_venv())
