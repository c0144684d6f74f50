"""NeMo Gym's `env.yaml`: the head server it pins is where `collect_rollouts` goes, below the command line; nothing
else of the file is read, logged or saved."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gym_collect.errors import ConfigError
from gym_collect.nemo.env_yaml import find_env_yaml, head_server_overrides
from gym_collect.sim_agent import SimAgentConfig, SimAgentThread
from tests.conftest import make_rows, pairs, read_jsonl, write_rows

COLLECT = str(Path(sys.executable).parent / "collect_rollouts")
SECRET = "sk-env-yaml-secret-4242"


def env_yaml(folder: Path, head_server: object, **more: object) -> Path:
    """`folder/env.yaml` with NeMo Gym's usual keys (an API key among them) and `head_server`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "env.yaml"
    path.write_text(yaml.safe_dump({"policy_base_url": "http://127.0.0.1:1/v1", "policy_api_key": SECRET,
                                    "head_server": head_server, **more}))
    return path


def collect(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([COLLECT, "+agent_name=my_agent", "+input_jsonl_fpath=in.jsonl",
                           "+output_jsonl_fpath=out/rollouts.jsonl", "progress=false", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_head_server_pinned_in_env_yaml_is_used_and_its_secrets_go_nowhere(
        tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(6))
    with SimAgentThread(SimAgentConfig(service_time_s=0.0), agent_names=("my_agent",)) as sim:
        env_yaml(tmp_path, {"host": "127.0.0.1", "port": sim.agent.port})
        proc = collect(tmp_path, clean_env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert sorted(pairs(read_jsonl(tmp_path / "out" / "rollouts.jsonl"))) == [(i, 0) for i in range(6)]
    assert f"head server at http://127.0.0.1:{sim.agent.port}" in proc.stdout + proc.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "env.yaml"]
    assert written and not any(SECRET in p.read_text(errors="replace") for p in written)
    assert SECRET not in proc.stdout + proc.stderr


def test_the_command_line_wins_over_env_yaml(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(3))
    with SimAgentThread(SimAgentConfig(service_time_s=0.0), agent_names=("my_agent",)) as sim:
        env_yaml(tmp_path, {"host": "127.0.0.1", "port": 9})  # nothing listens there
        by_port = collect(tmp_path, clean_env, f"+head_server.port={sim.agent.port}")
        by_url = collect(tmp_path, clean_env, f"head_server_url={sim.url}", "overwrite=true")
    assert by_port.returncode == 0, by_port.stderr + by_port.stdout
    assert by_url.returncode == 0, by_url.stderr + by_url.stdout


def test_an_extra_root_comes_before_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "extra_a", tmp_path / "extra_b"  # the first has no env.yaml
    env_yaml(second, {"port": 11002})
    env_yaml(tmp_path, {"port": 11003})
    monkeypatch.setenv("NEMO_GYM_EXTRA_ROOTS", os.pathsep.join(map(str, (first, second))))
    found = find_env_yaml(tmp_path)
    assert found == second / "env.yaml"
    assert head_server_overrides(found) == ["++head_server.port=11002"]
    monkeypatch.delenv("NEMO_GYM_EXTRA_ROOTS")
    assert find_env_yaml(tmp_path) == tmp_path / "env.yaml"
    assert find_env_yaml(tmp_path / "elsewhere") is None


@pytest.mark.parametrize(
    ("head_server", "expected"),
    [(None, []), ({"host": "10.0.0.7"}, ["++head_server.host=10.0.0.7"]),
     ({"host": "head-0.cluster", "port": 11001}, ["++head_server.host=head-0.cluster", "++head_server.port=11001"])],
)
def test_overrides_follow_what_the_file_sets(tmp_path: Path, head_server: object, expected: list[str]) -> None:
    assert head_server_overrides(env_yaml(tmp_path, head_server)) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("head_server: [1, 2]\n", "head_server must be a mapping"),
     ("head_server: {port: yes}\n", "head_server.port must be an integer"),
     ("head_server: {host: 'a b=c'}\n", "head_server.host must be a host name"),
     ("head_server: {port: 1\n", "not valid YAML at line 3")],
)
def test_a_bad_env_yaml_is_one_line_naming_it(tmp_path: Path, clean_env: dict[str, str], text: str,
                                              message: str) -> None:
    (tmp_path / "env.yaml").write_text(f"policy_api_key: {SECRET}\n{text}")
    with pytest.raises(ConfigError, match=message):
        head_server_overrides(tmp_path / "env.yaml")
    write_rows(tmp_path / "in.jsonl", make_rows(2))
    proc = collect(tmp_path, clean_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr and "env.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr and SECRET not in proc.stderr + proc.stdout
    assert not (tmp_path / "out").exists()


def test_relative_input_and_prompt_paths_are_found_as_nemo_gym_finds_them(
        tmp_path: Path, clean_env: dict[str, str]) -> None:
    root, run_dir = tmp_path / "gym_root", tmp_path / "elsewhere"
    (root / "data").mkdir(parents=True)
    run_dir.mkdir()
    write_rows(root / "data" / "rows.jsonl", [{"question": f"q{i}"} for i in range(4)])
    (root / "data" / "prompt.yaml").write_text("system: null\nuser: 'Q: {question}'\n")
    args = ["+input_jsonl_fpath=data/rows.jsonl", "+prompt_config=data/prompt.yaml", "+output_jsonl_fpath=out.jsonl",
            "progress=false", "disable_aggregation=true"]
    with SimAgentThread(SimAgentConfig(service_time_s=0.0)) as sim:
        env = {**clean_env, "NEMO_GYM_EXTRA_ROOTS": str(root)}
        found = subprocess.run([COLLECT, f"agent_url={sim.url}", *args], cwd=run_dir, env=env, capture_output=True,
                               text=True, timeout=120)
        missing = subprocess.run([COLLECT, f"agent_url={sim.url}", *args, "overwrite=true"], cwd=run_dir,
                                 env=clean_env, capture_output=True, text=True, timeout=120)
    assert found.returncode == 0, found.stderr + found.stdout
    written = read_jsonl(run_dir / "out.jsonl")  # written where it was asked for, not under the root
    prompts = sorted(r["responses_create_params"]["input"][0]["content"] for r in written)
    assert prompts == [f"Q: q{i}" for i in range(4)]
    assert missing.returncode == 2 and "data/rows.jsonl: input file not found" in missing.stderr + missing.stdout
