"""The command line before Hydra parses it: checking override keys, and keeping secrets out of Hydra's files.

Checking. Every `key=value` is checked against the schema, so a misspelled key is an error naming the
closest valid key (NeMo Gym silently ignores it). NeMo Gym's `+key=value` spelling is accepted for every key
(rewritten to Hydra's add-or-override `++key=value`). Hydra's own vocabulary passes: its flags (the list
follows `get_args_parser` in hydra/_internal/utils.py, Hydra 1.3), `hydra.*` keys, config-group overrides
such as `hydra/launcher=submitit_slurm` (with `+`, `++`, `~` or `@package`), groups of a `--config-dir`,
and the sub-commands of `-sc/--shell-completion` (`install=bash`).

Secrets. Hydra writes the command line's overrides to the console sweep line, `multirun.yaml`, each job's
`.hydra/overrides.yaml` and `hydra.yaml`, and launchers pickle them for remote jobs (submitit's
`.submitit/*_submitted.pkl`). So a literal secret on the command line (a `headers.*` value, the userinfo
of a URL in `agent_url`, `head_server_url` or `agents.*`) is moved into an environment variable of this
process, `GYM_COLLECT_SECRET_<n>`, and the override refers to it as `${oc.env:GYM_COLLECT_SECRET_<n>}`:
what Hydra stores and ships holds the reference; each job resolves it from the environment it inherits
(a local subprocess, a Slurm job submitted from here, workers of a Ray instance started from here).
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gym_collect.config import CollectConfig, config_keys, open_keys
from gym_collect.errors import ConfigError
from gym_collect.redact import AUTH_SCHEME, Redactor, userinfo_span

HYDRA_FLAGS_WITH_VALUE = frozenset({
    "--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
    "--experimental-rerun"})
HYDRA_INFO_FLAGS = frozenset({"--info", "-i"})
HYDRA_INFO_CHOICES = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})
HYDRA_COMPLETION_FLAGS = frozenset({"--shell-completion", "-sc"})
CONFIG_DIR_FLAGS = frozenset({"--config-dir", "-cd", "--config-path", "-cp"})
OVERRIDE = re.compile(r"^(?P<prefix>\+{0,2}|~)(?P<key>[A-Za-z_][\w.\-/@]*)(?P<rest>=.*)?$", re.DOTALL)
SECRET_ENV_PREFIX = "GYM_COLLECT_SECRET_"
SECRET_KEYS = ("headers",)
URL_KEYS = ("agent_url", "head_server_url", "agents", "head_server")
ENV_DEFAULT = re.compile(r"\$\{oc\.env:(?P<name>[^,}]+),(?P<value>.*)\}", re.DOTALL)
SECRET_ARG = re.compile(r"^[+~]*(?P<key>(?:headers|agent_url|head_server_url|agents)\b[\w.\-]*)")


def normalize_overrides(args: Sequence[str], schema: type = CollectConfig) -> list[str]:
    """Check each `key=value` override against the schema and accept NeMo Gym's `+key=value`.

    `args`: the command line after the program name. Returns it with `+key` rewritten to `++key`; Hydra's
    flags (and a flag's value), `hydra.*` keys, Hydra config groups and `--config-dir` groups pass as given.
    Raises `ConfigError` naming an unknown key (or Hydra config group) and the closest valid one.
    """
    valid = config_keys(schema)
    open_ = open_keys(schema)
    user_groups = _config_dir_groups(args)
    if any(arg in HYDRA_COMPLETION_FLAGS for arg in args):
        return list(args)  # the other words are the completion's sub-command (install=bash, query=...)
    out: list[str] = []
    takes_value = False
    for i, arg in enumerate(args):
        if takes_value or arg.startswith("-"):
            takes_value = arg in HYDRA_FLAGS_WITH_VALUE
            out.append(arg)
            continue
        if i > 0 and args[i - 1] in HYDRA_INFO_FLAGS and arg in HYDRA_INFO_CHOICES:
            out.append(arg)  # `--info plugins`: the flag's optional value
            continue
        match = OVERRIDE.match(arg)
        if match is None:
            out.append(arg)
            continue
        key = match["key"]
        group = key.split("@", 1)[0]
        top = group.split(".", 1)[0].split("/", 1)[0]
        if top == "hydra" or top in user_groups:
            if "/" in group:
                _check_hydra_group(group, user_groups)
            out.append(arg)
            continue
        if key not in valid and top not in open_:
            open_top = difflib.get_close_matches(top, open_, n=1, cutoff=0.75) if "." in key else []
            close = [open_top[0] + key[len(top):]] if open_top else difflib.get_close_matches(key, valid, n=1,
                                                                                              cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else "; see `collect_rollouts --help` for the keys"
            raise ConfigError(f"unknown config key {key!r} in {arg.split('=', 1)[0]!r}{hint}")
        if match["prefix"] == "+" or (match["prefix"] == "" and top in open_):
            arg = "++" + arg.lstrip("+")  # add-or-override: valid whether or not the key exists yet
        out.append(arg)
    return out


def hydra_groups() -> list[str]:
    """Hydra's config groups under `hydra/` (`launcher`, `sweeper`, `job_logging`, ...): those shipped in
    `hydra.conf` and those that installed plugins register in the ConfigStore (hydra_plugins.*)."""
    from hydra.core.config_store import ConfigStore
    from hydra.core.plugins import Plugins

    Plugins.instance()  # imports the installed plugins, which register their groups
    groups = {name for name in ConfigStore.instance().repo.get("hydra", {}) if not name.endswith(".yaml")}
    shipped = importlib.resources.files("hydra.conf") / "hydra"
    groups.update(p.name for p in shipped.iterdir() if p.is_dir())
    return sorted(groups)


def _check_hydra_group(group: str, user_groups: set[str]) -> None:
    parts = group.split("/")
    if parts[0] != "hydra" or len(parts) != 2 or parts[1] in user_groups:
        return
    known = hydra_groups()
    if parts[1] not in known:
        close = difflib.get_close_matches(parts[1], known, n=1, cutoff=0.5)
        hint = f"; did you mean 'hydra/{close[0]}'?" if close else f"; Hydra's groups: {', '.join(known)}"
        raise ConfigError(f"unknown Hydra config group {group!r}{hint}")


def _config_dir_groups(args: Sequence[str]) -> set[str]:
    """Names of the folders (config groups) in the `--config-dir`/`--config-path` given, if any."""
    groups: set[str] = set()
    for i, arg in enumerate(args):
        flag, _, value = arg.partition("=")
        if flag in CONFIG_DIR_FLAGS and not value and i + 1 < len(args):
            value = args[i + 1]
        if flag in CONFIG_DIR_FLAGS and value and Path(value).is_dir():
            groups.update(p.name for p in Path(value).iterdir() if p.is_dir())
    return groups


@dataclass
class HiddenSecrets:
    """The command line with its literal secrets replaced by `${oc.env:...}` references.

    `args`: the rewritten command line; `env`: the variables to set (name -> secret); `values`: every
    secret value, for redacting console output (`--cfg job --resolve` prints resolved values).
    """

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    values: list[str] = field(default_factory=list)
    _redactor: Redactor | None = field(default=None, repr=False, compare=False)

    def export(self, environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
        """Set the variables in `environ` (this process's environment, inherited by every job it starts)."""
        for name, value in self.env.items():
            environ[name] = value

    def redact(self, text: str) -> str:
        """`text` with every secret value replaced by `<redacted>` (as given, JSON-escaped, percent-encoded, and
        each long enough word of it: `gym_collect.redact.Redactor`)."""
        if self._redactor is None:
            self._redactor = Redactor(self.values)
        return self._redactor(text)


def hide_secrets(args: Sequence[str], environ: Mapping[str, str] = os.environ) -> HiddenSecrets:
    """Move literal secrets out of the overrides in `args` (already normalized) into environment variables.

    A `headers.NAME=VALUE` (or `headers={NAME: VALUE, ...}`) value without `${` becomes
    `${oc.env:GYM_COLLECT_SECRET_<n>}`; a URL's `user:password@` in `agent_url`, `head_server_url` or
    `agents.NAME` becomes `${oc.env:GYM_COLLECT_SECRET_<n>}@`. Values already written as `${oc.env:VAR}`
    are kept, and `VAR`'s current value is listed for redaction. Raises `ConfigError` for a header value
    that Hydra reads as a sweep or a list (`a,b`): quote it.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    hidden = HiddenSecrets([])
    parser: Any = None
    takes_value = False
    for arg in args:
        if takes_value or arg.startswith("-"):
            takes_value = arg in HYDRA_FLAGS_WITH_VALUE
            hidden.args.append(arg)
            continue
        match = OVERRIDE.match(arg)
        top = match["key"].split(".", 1)[0] if match else ""
        if match is None and (secret_arg := SECRET_ARG.match(arg)) is not None:
            raise ConfigError(f"cannot read the argument that starts with {secret_arg['key']!r} (its value is not "
                              "shown: it may be a secret): write it as KEY=VALUE, quoting the value, as in "
                              "'+headers.Authorization=\"Bearer ...\"'")
        if match is None or match["rest"] is None or top not in (*SECRET_KEYS, *URL_KEYS):
            hidden.args.append(arg)
            continue
        parser = parser or OverridesParser.create()
        try:
            override = parser.parse_override(arg)
        except Exception as exc:  # Hydra's OverrideParseException; Hydra reports it again, unredacted
            raise ConfigError(f"cannot parse the value of {match['key']!r} ({type(exc).__name__}): quote it, "
                              f"as in '{match['key']}=\"...\"'") from None
        if override.is_sweep_override() or override.is_delete():
            if top in SECRET_KEYS:
                raise ConfigError(f"{match['key']}: a header value is one string; quote a value that has "
                                  "commas, and do not sweep secrets")
            hidden.args.append(arg)
            continue
        value = override.value()
        key_text = arg.split("=", 1)[0]
        if top in SECRET_KEYS and match["key"] == top and not isinstance(value, Mapping | None):
            raise ConfigError(f"{top} is a mapping NAME: VALUE: pass {top}.NAME=VALUE, as in "
                              "'+headers.Authorization=\"Bearer ...\"'")
        if top == "head_server" and not (isinstance(value, str) and "@" in value):
            hidden.args.append(arg)  # a host or a port: no userinfo to hide
            continue
        if top in SECRET_KEYS:
            hidden.args.append(f"{key_text}={_hide_header_value(value, match['key'], hidden, environ)}")
        elif isinstance(value, list):
            raise ConfigError(f"{match['key']}: a server address is one URL, and agents a mapping NAME: URL (as in "
                              "agents={math: 'http://127.0.0.1:8000'}), not a list; a comma sweeps (with -m)")
        else:
            hidden.args.append(f"{key_text}={_hide_url_value(value, hidden, environ)}")
    return hidden


def _new_reference(secret: str, hidden: HiddenSecrets) -> str:
    name = f"{SECRET_ENV_PREFIX}{len(hidden.env)}"
    hidden.env[name] = secret
    hidden.values.append(secret)
    return "${oc.env:" + name + "}"


def _note_env_references(text: str, hidden: HiddenSecrets, environ: Mapping[str, str]) -> None:
    for name in re.findall(r"\$\{oc\.env:([^,}]+)", text):
        value = environ.get(name.strip())
        if value:
            hidden.values.append(value)


def _hide_header_value(value: Any, key: str, hidden: HiddenSecrets, environ: Mapping[str, str]) -> str:
    if isinstance(value, Mapping):
        items = ", ".join(f"{k}: {_hide_header_value(v, f'{key}.{k}', hidden, environ)}"
                          for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, list):
        raise ConfigError(f"{key}: a header value is one string; quote a value that has commas")
    text = "" if value is None else str(value)
    if not text:
        return "''"
    return _quote(_hide_literals(text, hidden, environ))


def _hide_url_value(value: Any, hidden: HiddenSecrets, environ: Mapping[str, str]) -> str:
    if isinstance(value, Mapping):
        items = ", ".join(f"{k}: {_hide_url_value(v, hidden, environ)}" for k, v in value.items())
        return "{" + items + "}"
    if value is None:
        return "null"
    text = str(value)
    _note_env_references(text, hidden, environ)
    span = userinfo_span(text)
    if span is None:
        return _quote(text)
    start, end = span
    password = text[start:end].partition(":")[2]
    if password and "${" not in password:
        hidden.values.append(password)  # shown alone by a message that splits the URL
    return _quote(text[:start] + _hide_literals(text[start:end], hidden, environ) + text[end:])


def _hide_literals(text: str, hidden: HiddenSecrets, environ: Mapping[str, str]) -> str:
    """`text` with each literal stretch between its `${...}` interpolations moved into an environment variable
    (a reference in its place; OmegaConf joins adjacent interpolations into one string), but for a leading
    authentication scheme (`Bearer ` before `${oc.env:TOKEN}`), which is no secret."""
    out: list[str] = []
    for n, (literal, interpolation) in enumerate(_segments(text)):
        if literal and not (n == 0 and interpolation and _is_scheme_prefix(literal)):
            literal = _new_reference(literal, hidden)
        if interpolation:
            _note_env_references(interpolation, hidden, environ)
            if (default := ENV_DEFAULT.fullmatch(interpolation)) is not None and "${" not in default["value"]:
                # `${oc.env:VAR,default}`: the default is as secret as the variable's value
                value = default["value"].strip().strip("'\"")
                interpolation = interpolation if value.lower() in ("", "null", "~") else \
                    f"${{oc.env:{default['name']},{_new_reference(value, hidden)}}}"
        out.append(literal + interpolation)
    return "".join(out)


def _segments(text: str) -> list[tuple[str, str]]:
    """`text` as (literal, interpolation) pairs in order; an interpolation is a whole `${...}` with its nested
    braces, the last pair's may be empty. An unclosed `${` is literal."""
    pairs: list[tuple[str, str]] = []
    literal_start = i = 0
    while (start := text.find("${", i)) >= 0:
        depth, j = 0, start
        while j < len(text):
            if text.startswith("${", j):
                depth, j = depth + 1, j + 2
                continue
            if text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        if depth:
            break
        pairs.append((text[literal_start:start], text[start:j + 1]))
        literal_start = i = j + 1
    pairs.append((text[literal_start:], ""))
    return [(literal, interpolation) for literal, interpolation in pairs if literal or interpolation]


def _is_scheme_prefix(literal: str) -> bool:
    word = literal.strip()
    return literal.endswith((" ", "\t")) and AUTH_SCHEME.fullmatch(word) is not None


def _quote(text: str) -> str:
    """A Hydra override value holding `text` as a string (a quoted string keeps `${...}` interpolations)."""
    escaped = re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), text)
    return "'" + escaped + "'"
