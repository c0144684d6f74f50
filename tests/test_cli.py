"""The command line: override checking, Hydra composition, and the real console script in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gym_collect.cli import CONFIG_NAME, normalize_overrides, to_config
from gym_collect.errors import ConfigError
from gym_collect.sim_agent import SIM_HEAD_SECRET, SimAgentConfig, SimAgentThread
from tests.conftest import REPO, make_rows, pairs, read_jsonl, write_rows

COLLECT = str(Path(sys.executable).parent / "collect_rollouts")


def test_nemo_gym_plus_spelling_is_accepted_for_every_key() -> None:
    args = ["+agent_name=a", "limit=3", "++start_idx=1", "+responses_create_params.temperature=0.5",
            "headers.Authorization=Bearer x", "+tune.start=4", "hydra.run.dir=out", "--cfg", "job", "-m"]
    assert normalize_overrides(args) == [
        "++agent_name=a", "limit=3", "++start_idx=1", "++responses_create_params.temperature=0.5",
        "++headers.Authorization=Bearer x", "++tune.start=4", "hydra.run.dir=out", "--cfg", "job", "-m"]


@pytest.mark.parametrize(
    ("arg", "named", "suggested"),
    [("+num_samples_in_paralel=8", "num_samples_in_paralel", "num_samples_in_parallel"),
     ("output_jsonl_path=x", "output_jsonl_path", "output_jsonl_fpath"),
     ("tune.strat=2", "tune.strat", "tune.start")],
)
def test_misspelled_key_is_an_error_naming_it_and_the_closest(arg: str, named: str, suggested: str) -> None:
    with pytest.raises(ConfigError, match=rf"unknown config key '{named}'.*did you mean '{suggested}'"):
        normalize_overrides([arg])


def compose_config(*overrides: str):  # type: ignore[no-untyped-def]
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return to_config(compose(config_name=CONFIG_NAME, overrides=normalize_overrides(list(overrides))))


def test_compose_gives_typed_config_with_defaults_and_overrides() -> None:
    cfg = compose_config("+input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl", "+limit=7",
                         "num_samples_in_parallel=auto", "+responses_create_params.temperature=0.3")
    assert (cfg.limit, cfg.num_samples_in_parallel, cfg.responses_create_params) == (7, "auto", {"temperature": 0.3})
    assert (cfg.global_aiohttp_connector_limit, cfg.global_aiohttp_connector_limit_per_host) == (65536, 16384)
    assert cfg.head_server_url == "http://127.0.0.1:11000" and cfg.num_repeats == 1 and cfg.start_idx == 0
    assert compose_config("+resume_from_cache=true").resume is True


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [("+agent_map={a:b,_default:c}", "agent_map", {"a": "b", "_default": "c"}),
     ("+agent_map.a=b", "agent_map", {"a": "b"}),
     ("agent_map=null", "agent_map", None),
     ("+fan_out={a:[b,c]}", "fan_out", {"a": ["b", "c"]}),
     ("fan_out.a=[b]", "fan_out", {"a": ["b"]}),
     ("+num_repeats={a:3,_default:2}", "num_repeats", {"a": 3, "_default": 2}),
     ("+num_repeats.a=3", "num_repeats", {"a": 3}),
     ("+num_repeats=null", "num_repeats", 1),
     ("+environment_server_routes={ts:env}", "environment_server_routes", {"ts": "env"}),
     ("+count_failure_classes_as_zero=[agent_run_error]", "count_failure_classes_as_zero", ["agent_run_error"]),
     ("+responses_create_params={temperature:0.5}", "responses_create_params", {"temperature": 0.5}),
     ("+head_server.port=11001", "head_server_url", "http://127.0.0.1:11001"),
     ("+limit=0", "limit", None)],
)
def test_nemo_gym_command_line_values_land_in_the_config(override: str, field: str, expected: object) -> None:
    assert getattr(compose_config(override), field) == expected


def test_every_mapping_and_list_key_takes_a_whole_literal_with_plus() -> None:
    """NeMo Gym users write `+key={...}` and `+key=[...]`: every mapping or list key of the schema takes one (a
    key whose default is None would fail to merge)."""
    items = {"agents": "k:'http://127.0.0.1:8000'", "fan_out": "k:[v]", "num_repeats": "k:1"}
    defaults = vars(compose_config())
    keys = [name for name, value in defaults.items() if isinstance(value, dict | list) or name == "num_repeats"]
    assert {"agent_map", "fan_out", "num_repeats", "agents", "count_failure_classes_as_zero"} <= set(keys)
    for name in keys:
        literal = "[v]" if isinstance(defaults[name], list) else "{" + items.get(name, "k:v") + "}"
        value = getattr(compose_config(f"+{name}={literal}"), name)
        assert isinstance(value, type(defaults[name]) if defaults[name] != 1 else dict) and value, name


@pytest.mark.parametrize(
    ("override", "message"),
    [("limit=-1", "limit=-1 is invalid"), ("num_samples_in_parallel=0", "num_samples_in_parallel=0 is invalid"),
     ("end_idx=2", "end_idx=2 is below start_idx=5"), ("num_repeats=0", "num_repeats=0 is invalid"),
     ("request_timeout_s=0", "request_timeout_s=0"), ("output_order=random", "output_order='random'"),
     ("+dispatch_budget_s=60", "dispatch_budget_s needs num_samples_in_parallel"),
     ("+headers.Authorization=Bearer ${oc.env:GYM_COLLECT_TEST_UNSET}",
      r"^bad configuration at headers\.Authorization: .*'GYM_COLLECT_TEST_UNSET' not found\S*$"),
     ("+fan_out={a:[]}", "fan_out.a is an empty list"), ("+fan_out={a:[b,c,b]}", r"more than once \(b\)")],
)
def test_bad_values_fail_at_start_up(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        compose_config("start_idx=5", override)


def test_example_config_file_composes() -> None:
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        cfg = to_config(compose(config_name="example"))
    assert cfg.num_repeats == 2 and cfg.responses_create_params["temperature"] == 0.7


def test_seed_style_command_against_a_head_server_on_port_11000(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "prompts.jsonl", make_rows(150))
    with SimAgentThread(SimAgentConfig(capacity=64, service_time_s=0.02), port=11000,
                        agent_names=("my_agent",)) as sim:
        proc = subprocess.run(
            [COLLECT, "+agent_name=my_agent", "+input_jsonl_fpath=prompts.jsonl",
             "+output_jsonl_fpath=rollouts.jsonl", "+limit=100", "+num_samples_in_parallel=8"],
            cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=120,
        )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert sorted(pairs(read_jsonl(tmp_path / "rollouts.jsonl"))) == [(i, 0) for i in range(100)]
    assert (tmp_path / "rollouts_metrics.json").exists()
    assert sim.stats.max_in_flight == 8
    everything = proc.stdout + proc.stderr + "".join(
        p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert SIM_HEAD_SECRET not in everything
    assert "Rollouts: 100 written" in proc.stdout + proc.stderr


def test_typo_key_fails_before_anything_runs(tmp_path: Path, clean_env: dict[str, str]) -> None:
    proc = subprocess.run([COLLECT, "+input_jsonl_fpath=x", "+num_sample_in_parallel=8"], cwd=tmp_path,
                          env=clean_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "unknown config key 'num_sample_in_parallel'" in proc.stderr
    assert "did you mean 'num_samples_in_parallel'" in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_python_dash_m_and_hydra_flags(tmp_path: Path, clean_env: dict[str, str]) -> None:
    help_ = subprocess.run([sys.executable, "-m", "gym_collect", "--help"], cwd=tmp_path, env=clean_env,
                           capture_output=True, text=True, timeout=60)
    assert help_.returncode == 0 and "num_samples_in_parallel" in help_.stdout
    cfg = subprocess.run([COLLECT, "--cfg", "job", "+limit=5"], cwd=tmp_path, env=clean_env,
                         capture_output=True, text=True, timeout=60)
    assert cfg.returncode == 0 and "limit: 5" in cfg.stdout


def test_missing_input_is_one_clear_line(tmp_path: Path, clean_env: dict[str, str]) -> None:
    proc = subprocess.run([COLLECT, "input_jsonl_fpath=missing.jsonl", "output_jsonl_fpath=out.jsonl",
                           "agent_name=a", "agent_url=http://127.0.0.1:9"],
                          cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "missing.jsonl: input file not found; check input_jsonl_fpath" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_multirun_runs_every_job(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "prompts.jsonl", make_rows(10))
    proc = subprocess.run(
        [COLLECT, "-m", "num_samples_in_parallel=2,4", "input_jsonl_fpath=prompts.jsonl",
         "output_jsonl_fpath=out_${num_samples_in_parallel}.jsonl", "agent_name=sim_agent", "sim.enabled=true",
         "sim.service_time_s=0.001"], cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert len(read_jsonl(tmp_path / "out_2.jsonl")) == len(read_jsonl(tmp_path / "out_4.jsonl")) == 10


@pytest.mark.parametrize("args", [
    ["hydra/launcher=submitit_slurm"], ["+hydra/launcher=ray"], ["++hydra/sweeper=basic"], ["~hydra/job_logging"],
    ["hydra/job_logging=disabled", "hydra/hydra_logging@hydra.hydra_logging=default"],
    ["--info"], ["--info", "plugins"], ["-i", "defaults-tree"], ["-sc", "install=bash"],
    ["--shell-completion", "query=collect_rollouts", "hydra/"], ["--cfg=job"], ["-cn", "example", "-c", "job"],
    ["--experimental-rerun", "x.pickle"], ["hydra.launcher.timeout_min=5", "hydra.job.chdir=false"],
])
def test_hydra_groups_and_flags_pass_unchanged(args: list[str]) -> None:
    assert normalize_overrides(args) == args


def test_config_dir_groups_pass_and_typos_in_hydra_groups_are_caught(tmp_path: Path) -> None:
    (tmp_path / "agent").mkdir()
    assert normalize_overrides(["-cd", str(tmp_path), "agent=math"]) == ["-cd", str(tmp_path), "agent=math"]
    with pytest.raises(ConfigError, match="unknown config key 'agent'"):
        normalize_overrides(["agent=math"])
    with pytest.raises(ConfigError, match=r"unknown Hydra config group 'hydra/job_loging'.*'hydra/job_logging'"):
        normalize_overrides(["hydra/job_loging=disabled"])
    with pytest.raises(ConfigError, match="did you mean 'num_repeats'"):
        normalize_overrides(["--info", "num_repets=2"])


def test_literal_secrets_become_environment_references() -> None:
    from gym_collect.overrides import hide_secrets

    hidden = hide_secrets(normalize_overrides([
        "-m", "headers.Authorization=Bearer abc def", "agent_url=http://u:p%40ss@127.0.0.1:9/x",
        "agents.b=http://h:1", "headers.X=${oc.env:TOKEN}", "head_server_url=http://127.0.0.1:11000"]),
        environ={"TOKEN": "from-env"})
    assert hidden.args == [
        "-m", "++headers.Authorization='${oc.env:GYM_COLLECT_SECRET_0}'",
        "agent_url='http://${oc.env:GYM_COLLECT_SECRET_1}@127.0.0.1:9/x'", "++agents.b='http://h:1'",
        "++headers.X='${oc.env:TOKEN}'", "head_server_url='http://127.0.0.1:11000'"]
    assert hidden.env == {"GYM_COLLECT_SECRET_0": "Bearer abc def", "GYM_COLLECT_SECRET_1": "u:p%40ss"}
    assert hidden.redact("x Bearer abc def from-env u:p%40ss") == "x <redacted> <redacted> <redacted>"
    with pytest.raises(ConfigError, match="do not sweep secrets"):
        hide_secrets(["-m", "headers.A=a,b"])


@pytest.mark.parametrize(("arg", "secret"), [
    ("+headers.Authorization=Bearer SEKRET123-${oc.env:OCTOK}", "SEKRET123-"),  # a literal beside an interpolation
    ("headers={X-Key: 'Token SEKRET123'}", "SEKRET123"),  # a whole mapping, without `+`
    ("agent_url=user:PASSW0RD@127.0.0.1:80", "PASSW0RD"),  # no scheme
    ("agent_url=http:/user:PASSW0RD@127.0.0.1:80", "PASSW0RD"),  # one slash: a URL parser sees a path
    ("agent_url=http://user:PASS/W0RD@127.0.0.1:8", "PASS/W0RD"),  # an unescaped `/` in the password
    ("agents={a: 'http://u:${oc.env:OCTOK}x9SEKRET@h:1'}", "x9SEKRET"),
])
def test_no_literal_secret_is_left_in_what_hydra_saves(arg: str, secret: str) -> None:
    from gym_collect.overrides import hide_secrets

    hidden = hide_secrets(normalize_overrides([arg]), environ={"OCTOK": "octok-value"})
    assert secret not in " ".join(hidden.args) and hidden.env
    assert secret in "".join(hidden.env.values())
    said = hidden.redact(f"at {secret} and octok-value")
    assert secret not in said and ("octok-value" in said) == ("OCTOK" not in arg)


def test_a_leading_authentication_scheme_stays_readable() -> None:
    from gym_collect.overrides import hide_secrets
    from gym_collect.redact import Redactor

    hidden = hide_secrets(["++headers.Authorization=Bearer ${oc.env:OCTOK}"], environ={"OCTOK": "octok-value"})
    assert hidden.args == ["++headers.Authorization='Bearer ${oc.env:OCTOK}'"] and not hidden.env
    redact = Redactor(["Bearer tok-123456"])
    assert redact("the server expected a Bearer token, not Bearer tok-123456") == \
        "the server expected a Bearer token, not <redacted>"


@pytest.mark.parametrize("arg", ["+headers.Authorization:Bearer SEKRET123", '+headers.Bad Name="SEKRET123"',
                                 "agent_url http://u:SEKRET123@h"])
def test_an_unreadable_secret_argument_is_refused_without_its_value(arg: str) -> None:
    from gym_collect.overrides import hide_secrets

    with pytest.raises(ConfigError) as caught:
        hide_secrets(normalize_overrides([arg]))
    assert "SEKRET123" not in str(caught.value) and "KEY=VALUE" in str(caught.value)


def test_a_short_header_value_leaves_every_log_line_readable(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(11))
    with SimAgentThread(SimAgentConfig(service_time_s=0.0), agent_names=("my_agent",)) as sim:
        proc = subprocess.run(
            [COLLECT, "+agent_name=my_agent", "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out/r.jsonl",
             f"head_server_url={sim.url}", "progress=false", "+headers.X-Tenant=1",
             "+headers.Authorization=Bearer tok-123456"],
            cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=120)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said
    assert "Rollouts: 11 written" in said and "<redacted>" not in said
    assert sim.stats.authorization_values == {"Bearer tok-123456"} and "tok-123456" not in said


@pytest.mark.parametrize(("args", "said"), [
    (["+header.Authorization=x"], "did you mean 'headers.Authorization'?"),
    (["headrs.X-Key=1"], "did you mean 'headers.X-Key'?"),
    (["agents=[a,b]"], "agents: a server address is one URL, and agents a mapping NAME: URL"),
    (["agent_url=[http://127.0.0.1:9]"], "agent_url: a server address is one URL"),
])
def test_near_misses_of_mapping_keys_and_lists_for_addresses_are_named(args: list[str], said: str) -> None:
    from gym_collect.overrides import hide_secrets

    with pytest.raises(ConfigError) as caught:
        hide_secrets(normalize_overrides(args))
    assert said in str(caught.value)


def test_a_literal_default_of_an_env_reference_is_hidden_and_still_sent(tmp_path: Path,
                                                                        clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(3))
    with SimAgentThread(SimAgentConfig(service_time_s=0.0), agent_names=("my_agent",)) as sim:
        proc = subprocess.run(
            [COLLECT, "+agent_name=my_agent", "+input_jsonl_fpath=in.jsonl", "+output_jsonl_fpath=out/r.jsonl",
             f"head_server_url={sim.url}", "progress=false",
             "+headers.Authorization=${oc.env:UNSET_TOKEN_VAR,Bearer tok-default-9876}"],
            cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sim.stats.authorization_values == {"Bearer tok-default-9876"}  # the default, resolved in the job
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"tok-default-9876" not in path.read_bytes(), path
    assert "tok-default-9876" not in proc.stdout + proc.stderr


def test_header_values_echoed_in_base64_are_redacted() -> None:
    import base64

    from gym_collect.redact import Redactor

    token = "tok-4f9c2a77e1d0b8"
    echoed = base64.b64encode(f"Bearer {token}".encode()).decode()
    said = Redactor([f"Bearer {token}"])(f"saw {echoed}")
    assert said.startswith("saw <redacted>") and echoed.rstrip("=") not in said
