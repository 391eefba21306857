"""Everything checked before a process group starts, so a bad config costs seconds, not a queued job.

`load_config(argv)` parses TOML + command line exactly as torchtitan does (with the recipe's sections)
and raises `ConfigError`, one line naming the key, for: an unknown section or key in the TOML file, a
value of the wrong type, an invalid [moe] value or flavor, a dataset path that does not exist.
"""

import dataclasses
import glob
import importlib
import os
import tomllib
import typing

from torchtitan.config import ConfigManager, JobConfig

from remoe_recipe.config import ConfigError, check_types

CUSTOM_CONFIG_MODULE = "remoe_recipe.config"
_FILE_FLAGS = ("--job.config_file", "--job.config-file")


def with_recipe_sections(argv: list[str]) -> list[str]:
    """Load the recipe's TOML sections unless the command line names a config module itself."""
    if any(a.split("=")[0] in ("--job.custom_config_module", "--job.custom-config-module") for a in argv):
        return argv
    return ["--job.custom_config_module", CUSTOM_CONFIG_MODULE, *argv]


def config_file(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key in _FILE_FLAGS:
            return value or (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def check_toml_keys(path: str, config_cls) -> None:
    """torchtitan reports unknown TOML keys with a multi-line message naming a class; name the key."""
    if not os.path.isfile(path):
        raise ConfigError(f"--job.config_file {path}: no such file")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    sections = {f.name: f.type for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"{path}: unknown section [{section}]; sections are {sorted(sections)}")
        section_cls = hints[section]
        if not isinstance(values, dict) or not dataclasses.is_dataclass(section_cls):
            continue
        keys = {f.name for f in dataclasses.fields(section_cls)}
        for key in values:
            if key not in keys:
                raise ConfigError(f"{path}: unknown key {section}.{key}; [{section}] keys are {sorted(keys)}")


def check_paths(config) -> None:
    checks = [("training.dataset_path", config.training.dataset_path)]
    if config.validation.enable:
        checks.append(("validation.dataset_path", config.validation.dataset_path))
    for key, path in checks:
        if not path:
            continue
        expanded = os.path.expanduser(path)
        exists = glob.glob(expanded) if any(c in expanded for c in "*?[") else os.path.exists(expanded)
        if not exists:
            raise ConfigError(f"{key} = {path!r}: no such file, folder or glob match")


def check_run_length(config) -> None:
    # torchtitan fails inside its scheduler for steps < 0 and "completes" a run of 0 steps.
    steps = config.training.steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"training.steps = {steps!r}: expected an integer >= 1")
    # The model's rotary table is built for training.seq_len; longer validation samples fail an assert.
    if config.validation.enable and config.validation.seq_len > config.training.seq_len:
        raise ConfigError(
            f"validation.seq_len = {config.validation.seq_len}: expected <= training.seq_len ({config.training.seq_len})"
        )


def check_routing_alerts(config) -> None:
    metrics = config.metrics
    if metrics.routing_alert_steps < 1:
        raise ConfigError(f"metrics.routing_alert_steps = {metrics.routing_alert_steps}: expected >= 1")
    if not 0 <= metrics.dead_expert_share < 1:
        raise ConfigError(f"metrics.dead_expert_share = {metrics.dead_expert_share}: expected 0 <= share < 1")


def check_tokenizer(config) -> None:
    """A tokenizer file is parsed here, before any process group: a malformed one is named with its line."""
    from remoe_recipe.data.tokenizer import _looks_like_path, load_tokenizer

    spec = getattr(config.model, "tokenizer_path", None) or "builtin"
    if spec != "builtin" and _looks_like_path(spec):
        try:
            load_tokenizer(spec)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None


def _config_module(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key in ("--job.custom_config_module", "--job.custom-config-module"):
            return value or argv[i + 1]
    return CUSTOM_CONFIG_MODULE


def load_config(argv: list[str], check_data: bool = True):
    """check_data=False skips the dataset-path check (the dry run validates a layout for another
    machine, where the data lives)."""
    argv = with_recipe_sections(argv)
    path = config_file(argv)
    if path is not None:
        recipe_sections = importlib.import_module(_config_module(argv)).JobConfig
        check_toml_keys(path, ConfigManager._merge_configs(JobConfig, recipe_sections))
    config = ConfigManager().parse_args(argv)
    check_types(config)
    from remoe_recipe.validate import validate_job_config

    validate_job_config(config)
    check_run_length(config)
    check_routing_alerts(config)
    if check_data:
        check_paths(config)
        check_tokenizer(config)
    return config
