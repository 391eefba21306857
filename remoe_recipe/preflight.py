"""Parse a run's config before any process group starts, so a bad config costs seconds, not a queued job.

`load_config(argv)` parses TOML + command line exactly as torchtitan does (with the recipe's sections),
refuses an unknown TOML section or key (torchtitan's own message is a multi-line traceback naming a class),
then runs the one config check (validate.py): `ConfigError`, one line per problem naming the key.
"""

import dataclasses
import importlib
import os
import tomllib
import typing

from torchtitan.config import ConfigManager, JobConfig

from remoe_recipe.config import ConfigError

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


def _config_module(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        key, _, value = arg.partition("=")
        if key in ("--job.custom_config_module", "--job.custom-config-module"):
            return value or argv[i + 1]
    return CUSTOM_CONFIG_MODULE


def load_config(argv: list[str], check_data: bool = True, world_size: int | None = None):
    """Parse and check (validate.check_config). check_data=False skips the checks that read this machine's
    files (the dry run validates a layout for another machine, where the data lives); world_size: the
    ranks to check the layout for (default: this launch's)."""
    from torchtitan.tools.logging import logger

    from remoe_recipe.run_log import quiet_known_noise

    quiet_known_noise(logger)  # the tools that load a config print no torchtitan noise either
    argv = with_recipe_sections(argv)
    path = config_file(argv)
    if path is not None:
        recipe_sections = importlib.import_module(_config_module(argv)).JobConfig
        check_toml_keys(path, ConfigManager._merge_configs(JobConfig, recipe_sections))
    config = ConfigManager().parse_args(argv)
    from remoe_recipe.validate import check_config

    check_config(config, world_size, check_data)
    return config
