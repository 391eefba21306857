"""Whole-config checks that run before any process group starts: one clear line per problem."""

import copy

from remoe_recipe.config import ConfigError, validate_moe
from remoe_recipe.model.args import remoe_flavors

TRAIN_SPEC_NAME = "remoe"


def validate_job_config(config) -> None:
    if config.model.name != TRAIN_SPEC_NAME:
        raise ConfigError(f"model.name = {config.model.name!r}: this recipe trains {TRAIN_SPEC_NAME!r}")
    flavors = remoe_flavors()
    if config.model.flavor not in flavors:
        raise ConfigError(
            f"model.flavor = {config.model.flavor!r}: expected one of {sorted(flavors)}"
        )
    validate_moe(config.moe)
    args = copy.deepcopy(flavors[config.model.flavor])
    args.moe = config.moe
    args.validate()
    if config.training.seq_len < 1 or config.training.local_batch_size < 1:
        raise ConfigError("training.seq_len and training.local_batch_size must be >= 1")
