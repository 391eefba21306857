"""Config checks that run before any process group: one line naming the key, for each kind of mistake."""

import subprocess
import sys

import pytest

from remoe_recipe.config import ConfigError
from remoe_recipe.preflight import load_config
from tests.runs import CONFIGS, REPO

DEBUG = (CONFIGS / "debug_remoe.toml").read_text()


def _write(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("top_k = 1", "top_k = 1\nnum_expert = 8", "unknown key moe.num_expert"),
        ("\n[moe]\n", "\n[moee]\n", "unknown section [moee]"),
        ("steps = 300", "stepz = 300", "unknown key training.stepz"),
        ("num_experts = 8", 'num_experts = "8"', "moe.num_experts = '8': expected int"),
        ("steps = 300", "steps = 3.5", "training.steps = 3.5"),
        ("router_init_std = 0.1", "router_init_std = 0", "moe.router_init_std = 0"),
        ("router_init_std = 0.1", 'router_init_std = "0.02"', "moe.router_init_std = '0.02'"),
    ],
)
def test_toml_mistakes_name_the_key(tmp_path, old, new, message):
    assert old in DEBUG
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(["--job.config_file", _write(tmp_path, DEBUG.replace(old, new, 1))])


def test_values_and_paths_are_checked(tmp_path):
    base = ["--job.config_file", str(CONFIGS / "debug_remoe.toml")]
    with pytest.raises(ConfigError, match=r"moe.top_k = 8: expected 1 <= top_k < moe.num_experts \(8\)"):
        load_config([*base, "--moe.top_k", "8"])
    with pytest.raises(ConfigError, match="model.flavor = '7B': expected one of"):
        load_config([*base, "--model.flavor", "7B"])
    with pytest.raises(ConfigError, match="training.dataset_path = '/no/such/corpus': no such"):
        load_config([*base, "--training.dataset_path", "/no/such/corpus"])
    with pytest.raises(ConfigError, match="validation.dataset_path"):
        load_config([*base, "--validation.dataset_path", str(tmp_path / "missing*.jsonl")])
    with pytest.raises(ConfigError, match="no such file"):
        load_config(["--job.config_file", str(tmp_path / "absent.toml")])


def test_entry_point_prints_one_line_and_exits_2(tmp_path):
    bad = _write(tmp_path, DEBUG.replace("top_k = 1", "top_k = 9"))
    proc = subprocess.run(
        [sys.executable, "-m", "remoe_recipe.train", "--job.config_file", bad],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "config error" in line]
    assert len(errors) == 1 and "moe.top_k = 9" in errors[0]
    assert "Traceback" not in proc.stderr


def test_show_config_keys_and_resolved(capsys):
    import dataclasses
    import tomllib

    from remoe_recipe.config import MoEConfig
    from remoe_recipe.show_config import main

    main(["keys"])
    keys = capsys.readouterr().out
    for f in dataclasses.fields(MoEConfig):
        listed = f"\n# {f.name} is unset" if f.default is None else f"\n{f.name} = "
        assert listed in "\n" + keys, f.name
    assert '"None"' not in keys  # an unset key is not shown as the string "None"
    assert "lambda_0 of the adaptive L1 penalty" in keys

    main(["resolved", "--job.config_file", str(CONFIGS / "debug_remoe.toml"), "--moe.top_k", "2"])
    resolved = tomllib.loads(capsys.readouterr().out)
    assert resolved["moe"]["top_k"] == 2  # command line
    assert resolved["training"]["steps"] == 300  # TOML
    assert resolved["training"]["max_norm"] == 1.0
    assert resolved["comm"]["init_timeout_seconds"] == 300  # torchtitan default
    assert resolved["model"]["name"] == "remoe"


def test_every_problem_is_one_line_in_one_error(tmp_path):
    """One pass reports all problems at once, one line each naming its key (not the first one only)."""
    with pytest.raises(ConfigError) as info:
        load_config([
            "--job.config_file", str(CONFIGS / "debug_topk.toml"),
            "--moe.top_k", "8",  # not < num_experts
            "--moe.l1_coeff_multiplier", "1.1",  # a relu key on a topk run
            "--training.steps", "0",
            "--metrics.routing_alert_steps", "0",
            "--data.mix", "abc",  # not "WEIGHT SOURCE"
            "--model.tokenizer_path", "gpt3",  # no such tokenizer
        ])
    lines = str(info.value).splitlines()
    keys = ["moe.top_k", "moe.l1_coeff_multiplier", "training.steps", "metrics.routing_alert_steps", "data.mix",
            "model.tokenizer_path"]
    for key in keys:
        assert sum(line.startswith(f"{key} ") or line.startswith(f"{key}:") or f" {key} " in line
                   for line in lines) == 1, (key, lines)
    assert len(lines) == len(keys), lines


def test_the_entry_point_logs_each_problem_on_its_own_line(tmp_path):
    bad = _write(tmp_path, DEBUG.replace("top_k = 1", "top_k = 9").replace("steps = 300", "steps = -1"))
    proc = subprocess.run(
        [sys.executable, "-m", "remoe_recipe.train", "--job.config_file", bad],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "config error: " in line]
    assert len(errors) == 2 and "moe.top_k = 9" in errors[0] and "training.steps = -1" in errors[1], errors
