"""A run tells its story: first lines, progress with ETA, saved config, final validation, no noise."""

import logging
import re

import pytest

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from remoe_recipe.analysis.runs import read_run
from remoe_recipe.preflight import load_config
from remoe_recipe.run_log import KNOWN_NOISE, rank_zero_only
from tests.runs import run_training


def _texts(log_dir):
    tags = {}
    for path in log_dir.glob("tb/**/events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "text":
                    tags[value.tag] = value.tensor.string_val[0].decode()
    return tags


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """One short run for this file: validation every 4 of 14 steps; lambda_0 = 10 with lr 3e-3 drives layers of
    the debug model to 100 % sparsity within ~10 steps (the issue's dead-routing case); alerts after 3 steps."""
    dump = tmp_path_factory.mktemp("story")
    proc = run_training(
        "debug_remoe.toml", dump, "--training.steps", "14", "--moe.l1_coeff_init", "10", "--optimizer.lr", "3e-3",
        "--validation.enable", "--validation.freq", "4", "--validation.steps", "2", "--validation.seq_len", "64",
        "--metrics.routing_alert_steps", "3",
    )
    return dump, proc.stdout + proc.stderr, read_run(dump)


def test_a_short_run_tells_its_story(story):
    dump, out, scalars = story
    lines = [line.split(" - ", 3)[-1] for line in out.splitlines() if line.startswith("[titan]")]
    assert lines[0].startswith("Run: config ") and "14 steps" in lines[0]
    assert lines[1].startswith("Data: training 'shakespeare', validation 'shakespeare', tokenizer 'builtin'")
    assert lines[2] == "Parallel layout: 1 rank: dp_shard=1"
    assert re.search(r"step 12/14 \(86 %\), ETA 0:\d\d:\d\d", out)
    for noise in KNOWN_NOISE:
        assert noise not in out, noise
    assert "CPU autocast" not in out and "set_vital" not in out
    assert "mfu: nan%" in out  # no A100 peak on CPU
    # Validation every 4 steps, and once more at the last step (14), which 4 does not divide.
    assert sorted(scalars["validation_metrics/loss"]) == [1, 4, 8, 12, 14]
    # The resolved config, overrides included, is saved as TOML and as TensorBoard text.
    saved = load_config(["--job.config_file", str(dump / "config.toml")])
    assert saved.moe.l1_coeff_init == 10 and saved.training.steps == 14 and saved.training.seq_len == 64
    assert "l1_coeff_init = 10" in _texts(dump)["config/text_summary"]
    [folder] = [p.name for p in (dump / "tb").iterdir()]
    assert re.fullmatch(r"\d{8}-\d{6}", folder)  # this run's own folder, named to the second


def test_unhealthy_layers_are_flagged_and_named_as_the_runs_own_metrics_show(story):
    """A layer is unhealthy at step s exactly when the logged per-layer metrics show more than half of its 8
    experts dead, or no active gate, at steps s - 2, s - 1 and s (routing_alert_steps 3, dead_expert_share 0.5)."""
    _, out, scalars = story
    named = set()
    for layer in range(4):
        dead = scalars[f"moe_layers/dead_experts/layer_{layer}"]
        sparse = scalars[f"moe_layers/sparsity/layer_{layer}"]
        sick = {s: dead[s] > 4 or sparse[s] == 1.0 for s in dead}
        flags = scalars[f"moe_layers/unhealthy/layer_{layer}"]
        for step in range(3, 15):
            assert flags[step] == float(sick[step - 2] and sick[step - 1] and sick[step]), (layer, step)
            if flags[step] and not flags.get(step - 1):
                named.add(layer)
                assert f"step {step}: MoE layer {layer} has" in out, (layer, step)
    assert named, "no layer was unhealthy: the test needs a sparser run"


def test_only_rank_zero_logs_unless_asked(monkeypatch):
    config = load_config(["--job.config_file", "train_configs/debug_remoe.toml"])
    logger = logging.getLogger("remoe-test-ranks")
    monkeypatch.setenv("RANK", "1")
    rank_zero_only(logger, config)
    assert logger.level == logging.ERROR
    logger.setLevel(logging.INFO)
    config.metrics.log_all_ranks = True
    rank_zero_only(logger, config)
    assert logger.level == logging.INFO
    monkeypatch.setenv("RANK", "0")
    config.metrics.log_all_ranks = False
    rank_zero_only(logger, config)
    assert logger.level == logging.INFO


def test_each_run_gets_its_own_tensorboard_folder(tmp_path, monkeypatch):
    import time

    from remoe_recipe.run_log import unique_tensorboard_name

    config = load_config(["--job.config_file", "train_configs/debug_remoe.toml", "--job.dump_folder", str(tmp_path)])
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-120000")
    assert unique_tensorboard_name(config) == "20260101-120000"
    (tmp_path / "tb" / "20260101-120000").mkdir(parents=True)
    assert unique_tensorboard_name(config) == "20260101-120000-2"  # a second run in the same second
    (tmp_path / "tb" / "20260101-120000-2").mkdir()
    assert unique_tensorboard_name(config) == "20260101-120000-3"
