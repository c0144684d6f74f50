"""How an input row becomes `POST /run` bodies, as NeMo Gym 0.7 materializes them
(`nemo_gym/rollout_collection.py:2091-2200`, `nemo_gym/prompt.py`):

1. `prompt_config` (a YAML `{user, system?}` of `str.format` templates over the row's fields) builds
   `responses_create_params.input`; a row that already has an input is an error.
2. The `responses_create_params` overrides are shallow-merged in.
3. Routing (`gym_collect.nemo.routing`) sets `agent_ref` and the agents the row runs on.
4. For each agent, `num_repeats` rollouts (a map picks by agent, then by the row's routing key) with
   `_ng_task_index` and consecutive `_ng_rollout_index`; `num_repeats_add_seed` puts the rollout index as
   `seed` into `responses_create_params.metadata.extra_body` (a JSON string, as vLLM reads it).
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gym_collect.errors import AnsweredBadly, ConfigError, InputError, PermanentRolloutError
from gym_collect.nemo.routing import (
    AGENT_REF_KEY,
    ENVIRONMENT_SERVER_KEY,
    ENVIRONMENT_TARGET,
    UNNAMED_AGENT,
    RouteKey,
    RowRouter,
)
from gym_collect.nemo.search_roots import resolve_read_path
from gym_collect.yaml_file import read_yaml

# copied from the row onto its results, in 0.7's order (`rollout_collection.py:2597-2616`)
RESULT_STAMP_KEYS = ("task_source", "skills_ref", "_ng_attempt_index", "_ng_rollout_id")
TASK_INDEX_KEY = "_ng_task_index"
ATTEMPT_INDEX_KEY = "_ng_attempt_index"
ROLLOUT_ID_KEY = "_ng_rollout_id"
# what the collector adds to a record itself: an environment server result must not carry them
# (`_is_collector_key`, `nemo_gym/rollout_collection.py:331-333`)
COLLECTOR_RESULT_KEYS = frozenset({"ng_trajectory", "ng_model_call_capture", "ng_perf"})
TASK_ID_KEY = "_ng_task_id"
ROLLOUT_INDEX_KEY = "_ng_rollout_index"
RESPONSES_CREATE_PARAMS_KEY = "responses_create_params"


@dataclass(frozen=True)
class PromptConfig:
    """A prompt template: `user` (required) and `system` (optional), each a `str.format` template."""

    user: str
    system: str | None = None

    @classmethod
    def load(cls, path: str) -> PromptConfig:
        """Read a prompt YAML file (a relative path is looked for as NeMo Gym 0.7 looks for it,
        `gym_collect.nemo.search_roots`); raises `ConfigError` naming the file."""
        data = read_yaml(resolve_read_path(path), f"prompt_config={path}")
        if not isinstance(data, dict) or not isinstance(data.get("user"), str) or not isinstance(
                data.get("system"), str | None):
            raise ConfigError(f"prompt_config={path}: needs a `user` template (and optionally `system`), as strings")
        for name in ("system", "user"):
            template = data.get(name)
            try:
                fields = [field for _, field, _, _ in string.Formatter().parse(template or "") if field is not None]
            except ValueError as exc:
                raise ConfigError(f"prompt_config={path}: the {name} template is not a format string ({exc}); "
                                  "write a literal brace as {{ or }}") from None
            if any(not field or field[0].isdigit() for field in fields):
                raise ConfigError(f"prompt_config={path}: the {name} template has a positional field ({{}} or "
                                  "{0}); name the row's field, as in {question}")
        return cls(data["user"], data.get("system"))

    def messages(self, row: Mapping[str, Any], where: str) -> list[dict[str, str]]:
        """The input messages for `row`; raises `InputError` naming `where` for a field the row lacks."""
        try:
            messages = [] if self.system is None else [{"role": "system", "content": self.system.format_map(row)}]
            messages.append({"role": "user", "content": self.user.format_map(row)})
        except KeyError as exc:
            raise InputError(f"{where}: the prompt template needs field {exc} but the row has only "
                             f"{', '.join(row)}; fix the template or the data") from None
        except (AttributeError, IndexError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: the prompt template cannot be filled from this row ({type(exc).__name__}: "
                             f"{exc}); fix the template or the data") from None
        return messages


class RequestBuilder:
    """Turns rows into the (rollout index, agent, `agent_ref`, body) of each rollout (module docstring).

    Args:
        router: the routing of rows to agents (resolved before `build` is called).
        repeats_for: `num_repeats` for (agent, routing key); None when a map has no entry for either.
        overrides: the `responses_create_params` overrides.
        add_seed: `num_repeats_add_seed`.
        prompt: `prompt_config`, loaded.
    """

    def __init__(self, router: RowRouter, repeats_for: Callable[[str | None, str | None], int | None],
                 overrides: Mapping[str, Any], *, add_seed: bool = False, prompt: PromptConfig | None = None) -> None:
        self.router = router
        self.repeats_for = repeats_for
        self.overrides = dict(overrides)
        self.add_seed = add_seed
        self.prompt = prompt

    def check(self, row: dict[str, Any], where: str) -> RouteKey:
        """Check a row before any request (prompt fields, routing); its `RouteKey`. Raises `InputError` or
        `ConfigError` naming `where`."""
        if self.prompt is not None:
            rcp = row.get(RESPONSES_CREATE_PARAMS_KEY)
            if isinstance(rcp, dict) and rcp.get("input"):
                raise InputError(f"{where}: the row has responses_create_params.input and prompt_config is set; "
                                 "they are mutually exclusive: drop one")
            self.prompt.messages(row, where)
        rcp = row.get(RESPONSES_CREATE_PARAMS_KEY)
        if (self.overrides or self.add_seed) and rcp is not None and not isinstance(rcp, dict):
            raise InputError(f"{where}: responses_create_params is a JSON {type(rcp).__name__}, not an object, so "
                             "the responses_create_params overrides and num_repeats_add_seed cannot merge into it; "
                             "fix the row")
        key = self.router.key(row, where)
        if key.targets[0].startswith(ENVIRONMENT_TARGET) and (self.overrides or self.add_seed or self.prompt):
            raise ConfigError(f"{where}: a materialized task row is sent as it is: responses_create_params "
                              "overrides, num_repeats_add_seed and prompt_config do not apply to it (NeMo Gym 0.7 "
                              "refuses them too)")
        return key

    def rollouts(self, key: RouteKey) -> int:
        """How many rollouts a row with this key gets; raises `ConfigError` when `num_repeats` has no entry."""
        total = 0
        for agent in self.router.targets(key):
            repeats = self.repeats_for(agent, key.basis)
            if repeats is None:
                raise ConfigError(f"num_repeats has no entry for {agent!r} (or {key.basis!r}) and no _default: "
                                  f"add num_repeats.{agent}=N or num_repeats._default=N")
            total += repeats
        return total

    def build(self, row: dict[str, Any], task_index: int, where: str, skip: Callable[[int], bool],
              first_rollout: int = 0, key: RouteKey | None = None, *,
              attempt_of: Callable[[int, int], int] | None = None, materialize: bool = False,
              ) -> Iterator[tuple[int, str, dict[str, Any] | None, bytes, int]]:
        """(rollout index, agent, `agent_ref`, body, attempt index) of each rollout of `row` that `skip` does
        not drop; rollout indices count on from `first_rollout` (earlier rows of the same task index).

        `attempt_of(task, rollout)` is the pair's `_ng_attempt_index` (attempts in earlier runs), set in the
        body when above 0 (`nemo_gym/rollout_collection.py:2303-2312`). With `materialize`, a taskset row's
        body is the row with its indices (what 0.7 writes to the materialized inputs), not the episode request.
        Mutates `row` (it is the reader's own parsed copy). `key` is the row's `RouteKey` when known.
        """
        key = key or self.router.key(row, where)
        if key.targets[0].startswith(ENVIRONMENT_TARGET):
            yield from self._episodes(row, key, task_index, skip, first_rollout, attempt_of, materialize)
            return
        if self.prompt is not None:
            own = row.get(RESPONSES_CREATE_PARAMS_KEY)
            row[RESPONSES_CREATE_PARAMS_KEY] = {**(own if isinstance(own, dict) else {}),
                                                "input": self.prompt.messages(row, where)}
        if self.overrides:
            own = row.get(RESPONSES_CREATE_PARAMS_KEY)
            row[RESPONSES_CREATE_PARAMS_KEY] = {**(own if isinstance(own, dict) else {}), **self.overrides}
        stamp = self.router.stamp(key)
        if stamp is not None and stamp != UNNAMED_AGENT:
            row[AGENT_REF_KEY] = {"name": stamp}
        if self.router.environment_server is not None:
            row[ENVIRONMENT_SERVER_KEY] = self.router.environment_server
        row[TASK_INDEX_KEY] = task_index
        own_ref = row.get(AGENT_REF_KEY)
        rollout = first_rollout
        for agent in self.router.targets(key):
            repeats = self.repeats_for(agent, key.basis) or 0
            if agent == UNNAMED_AGENT:
                ref = None
            elif isinstance(own_ref, dict) and own_ref.get("name") == agent:
                ref = own_ref
            else:
                ref = {"name": agent}
            for _ in range(repeats):
                if not skip(rollout):
                    attempt = attempt_of(task_index, rollout) if attempt_of is not None else 0
                    yield rollout, agent, ref, self._body(row, ref, rollout, attempt), attempt
                rollout += 1

    def _episodes(self, row: dict[str, Any], key: RouteKey, task_index: int, skip: Callable[[int], bool],
                  first_rollout: int, attempt_of: Callable[[int, int], int] | None, materialize: bool,
                  ) -> Iterator[tuple[int, str, dict[str, Any] | None, bytes, int]]:
        """Episode requests for a materialized task row (`nemo_gym/rollout_collection.py:299-314`), or with
        `materialize` the row itself with its indices and environment server."""
        target = key.targets[0]
        row[TASK_INDEX_KEY] = task_index
        row.setdefault(ENVIRONMENT_SERVER_KEY, target.removeprefix(ENVIRONMENT_TARGET))
        for rollout in range(first_rollout, first_rollout + (self.repeats_for(target, key.basis) or 0)):
            if skip(rollout):
                continue
            attempt = attempt_of(task_index, rollout) if attempt_of is not None else 0
            if materialize:
                row[ROLLOUT_INDEX_KEY] = rollout
                yield rollout, target, None, orjson.dumps(row), attempt
                continue
            rollout_id = row.get(ROLLOUT_ID_KEY) or f"{task_index}-{rollout}"
            body = {"episode_id": {"rollout_id": rollout_id, "attempt": attempt or row.get(ATTEMPT_INDEX_KEY, 0)},
                    "task": {"task_id": row["task_id"], "task_input": row["task_input"]}}
            yield rollout, target, None, orjson.dumps(body), attempt

    @staticmethod
    def result_stamps(row: Mapping[str, Any]) -> dict[str, Any]:
        """The row's fields NeMo Gym 0.7 sets on each of its results (`rollout_collection.py:2597-2612`)."""
        return {key: row[key] for key in RESULT_STAMP_KEYS if key in row}

    def _body(self, row: dict[str, Any], ref: dict[str, Any] | None, rollout: int, attempt: int = 0) -> bytes:
        row[ROLLOUT_INDEX_KEY] = rollout
        if ref is not None:
            row[AGENT_REF_KEY] = ref
        if attempt:
            row = {**row, ATTEMPT_INDEX_KEY: attempt}
        if not self.add_seed:
            return orjson.dumps(row)
        rcp = dict(row.get(RESPONSES_CREATE_PARAMS_KEY) or {})
        metadata = dict(rcp.get("metadata") or {})
        extra_body = json.loads(metadata.get("extra_body", "{}"))
        extra_body["seed"] = rollout
        metadata["extra_body"] = json.dumps(extra_body)  # json.dumps spacing, as NeMo Gym writes it
        rcp["metadata"] = metadata
        return orjson.dumps({**row, RESPONSES_CREATE_PARAMS_KEY: rcp})


def episode_record(answer: dict[str, Any]) -> dict[str, Any]:
    """The record of an environment server's episode answer (`{"episode_id", "task_id", "result" | "failure"}`),
    as NeMo Gym 0.7 stores it (`nemo_gym/rollout_collection.py:336-377`): the result as it is plus `_ng_task_id`,
    or a failure record of class `environment_server_failed`. Any other answer is returned unchanged.

    Raises `BadEpisodeError` (a failed rollout here; 0.7 stops the whole run) for a failure or result that is not
    an object, or a result that uses keys the collector writes itself (`_ng_*`, `ng_trajectory`, ...).
    """
    if not (isinstance(answer.get("episode_id"), dict) and isinstance(answer.get("task_id"), dict)
            and ("result" in answer or "failure" in answer)):
        return answer
    task_id = answer["task_id"]
    failure = answer.get("failure")
    if failure is not None:
        if not isinstance(failure, dict):
            raise BadEpisodeError(f"environment server answer for task {task_id!r} carries a non-object failure")
        record: dict[str, Any] = {
            TASK_ID_KEY: task_id,
            "_ng_failure_class": "environment_server_failed",
            "_ng_failure_terminal": bool(failure.get("terminal", False)),
            "_ng_failure_message": failure.get("failure_reason"),
        }
        for field, key in (("stage", "_ng_failure_stage"), ("partial_response", "_ng_failure_partial_response")):
            if failure.get(field) is not None:
                record[key] = failure[field]
        return record
    result = answer.get("result")
    if not isinstance(result, dict):
        raise BadEpisodeError(f"environment server answer for task {task_id!r} carries a non-object result")
    reserved = sorted(k for k in result if k.startswith("_ng_") or k in COLLECTOR_RESULT_KEYS)
    if reserved:
        raise BadEpisodeError(f"environment server result for task {task_id!r} uses keys reserved for rollout "
                              f"collection: {reserved}")
    return {**result, TASK_ID_KEY: task_id}


class BadEpisodeError(AnsweredBadly, PermanentRolloutError):
    """An environment server's episode answer that cannot be stored (`episode_record`): another attempt gets the
    same answer."""
