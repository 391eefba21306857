"""A run tells its story: first lines, progress with ETA, saved config, final validation, no noise."""

import logging
import re

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from remoe_recipe.preflight import load_config
from remoe_recipe.run_log import KNOWN_NOISE, rank_zero_only
from tests.runs import read_scalars, run_training


def _texts(log_dir):
    tags = {}
    for path in log_dir.glob("tb/**/events.out.tfevents.*"):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "text":
                    tags[value.tag] = value.tensor.string_val[0].decode()
    return tags


def test_a_short_run_tells_its_story(tmp_path):
    proc = run_training(
        "debug_remoe.toml", tmp_path, "--training.steps", "5", "--metrics.log_freq", "2",
        "--validation.enable", "--validation.freq", "4", "--validation.steps", "2", "--validation.seq_len", "64",
        "--moe.l1_coeff_multiplier", "1.5",
    )
    out = proc.stdout + proc.stderr
    lines = [line.split(" - ", 3)[-1] for line in out.splitlines() if line.startswith("[titan]")]
    assert lines[0].startswith("Run: config ") and "5 steps" in lines[0]
    assert lines[1].startswith("Data: training 'shakespeare', validation 'shakespeare', tokenizer 'builtin'")
    assert lines[2] == "Parallel layout: 1 rank: dp_shard=1"
    assert re.search(r"step 4/5 \(80 %\), ETA 0:\d\d:\d\d", out)
    for noise in KNOWN_NOISE:
        assert noise not in out, noise
    assert "CPU autocast" not in out and "set_vital" not in out
    assert "mfu: nan%" in out  # no A100 peak on CPU
    # Validation every 4 steps, and once more at the last step (5), not only at 4.
    scalars = read_scalars(tmp_path)
    assert sorted(scalars["validation_metrics/loss"]) == [1, 4, 5]
    # The resolved config, overrides included, is saved as TOML and as TensorBoard text.
    saved = load_config(["--job.config_file", str(tmp_path / "config.toml")])
    assert saved.moe.l1_coeff_multiplier == 1.5 and saved.training.steps == 5 and saved.training.seq_len == 64
    assert "l1_coeff_multiplier = 1.5" in _texts(tmp_path)["config/text_summary"]
    [folder] = [p.name for p in (tmp_path / "tb").iterdir()]
    assert re.fullmatch(r"\d{8}-\d{6}", folder)  # this run's own folder, named to the second


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
