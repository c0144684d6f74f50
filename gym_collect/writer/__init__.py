"""The only owner of a run's output files: paths, lock, whole-line appends, repair, atomic side files.

    paths.py     the run's file names; checks that none is a file the run reads
    lock.py      one run at a time per output (`flock`)
    lines.py     append-only JSONL of whole lines; torn-line repair; reading records back
    atomic.py    durable whole-file replacement (manifest, metrics, status)
    done.py      which (task, rollout) pairs are in the output
    reorder.py   the rollout writer, in completion or input order
    outputs.py   the lifecycle that ties them together
"""

from gym_collect.writer.atomic import replace_atomic, write_json_atomic
from gym_collect.writer.done import DoneSet
from gym_collect.writer.lines import LineFile, read_records, rollout_line
from gym_collect.writer.lock import OutputLock, OutputLockedError
from gym_collect.writer.outputs import PriorOutput, RunOutputs, count_done
from gym_collect.writer.paths import OutputPaths, check_input_file, followed, not_a_file
from gym_collect.writer.reorder import RolloutWriter

__all__ = [
    "DoneSet",
    "LineFile",
    "OutputLock",
    "OutputLockedError",
    "OutputPaths",
    "PriorOutput",
    "RolloutWriter",
    "RunOutputs",
    "check_input_file",
    "count_done",
    "followed",
    "not_a_file",
    "read_records",
    "replace_atomic",
    "rollout_line",
    "write_json_atomic",
]
