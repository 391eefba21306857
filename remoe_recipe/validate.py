"""The one config check: every problem of a parsed config, one line each naming the key, before any
process group starts. `preflight.load_config` (the trainer, the dry run, show_config, the analysis and
export tools) runs it once on every config it parses; it raises one ConfigError listing every problem.

What is checked where it is defined: types (config.type_problems), [moe] and the routers' own keys
(config.moe_problems, remoe_recipe/routers), the flavor's shapes (model/args.py), the schedule and the
metrics keys (config.py), the parallel layout (infra/layout.py), the data sources and the tokenizer
(data/checks.py); the run's length and sequence lengths here.
"""

import copy
import os

from remoe_recipe.config import ConfigError, metrics_problems, schedule_problems, type_problems
from remoe_recipe.infra.layout import check_layout
from remoe_recipe.model.args import remoe_flavors

TRAIN_SPEC_NAME = "remoe"


def run_problems(config) -> list[str]:
    problems = []
    steps = config.training.steps
    # torchtitan fails inside its scheduler for steps < 0 and "completes" a run of 0 steps.
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        problems.append(f"training.steps = {steps!r}: expected an integer >= 1")
    for key in ("seq_len", "local_batch_size"):
        if getattr(config.training, key) < 1:
            problems.append(f"training.{key} = {getattr(config.training, key)}: expected >= 1")
    # The model's rotary table is built for training.seq_len; longer validation samples fail an assert.
    if config.validation.enable and config.validation.seq_len > config.training.seq_len:
        problems.append(
            f"validation.seq_len = {config.validation.seq_len}: expected <= training.seq_len ({config.training.seq_len})"
        )
    return problems


def checkpoint_problems(config) -> list[str]:
    from remoe_recipe.hf.hf_config import hf_export_problem

    ckpt = config.checkpoint
    if ckpt.enable and ckpt.last_save_in_hf and (problem := hf_export_problem(config.moe.router)):
        return [f"checkpoint.last_save_in_hf: {problem}"]
    return []


def model_problems(config) -> list[str]:
    if config.model.name != TRAIN_SPEC_NAME:
        return [f"model.name = {config.model.name!r}: this recipe trains {TRAIN_SPEC_NAME!r}"]
    flavors = remoe_flavors()
    if config.model.flavor not in flavors:
        return [f"model.flavor = {config.model.flavor!r}: expected one of {sorted(flavors)}"]
    args = copy.deepcopy(flavors[config.model.flavor])
    args.moe = config.moe
    return args.problems()


def config_problems(config, world_size: int | None = None, check_data: bool = True) -> list[str]:
    """Every problem of `config`, one line each. check_data=False skips what needs this machine's files
    (the dry run validates a layout for another machine, where the data lives)."""
    from remoe_recipe.data.checks import data_config_problems

    problems = type_problems(config)
    if problems:
        return problems  # the other checks compare values of the declared types
    model = model_problems(config)
    problems += model + schedule_problems(config) + run_problems(config) + metrics_problems(config)
    if not model:  # the layout divides the experts the [moe] section asks for
        problems += checkpoint_problems(config)
        if world_size is None:
            # torchrun sets WORLD_SIZE; `python -m remoe_recipe.train` alone is one process;
            # torchtitan's fake-backend dry run takes its world size from NGPU.
            fake = config.comm.mode in ("fake_backend", "local_tensor")
            world_size = int(os.environ.get("NGPU" if fake else "WORLD_SIZE", "1"))
        try:
            check_layout(config, world_size)
        except ConfigError as e:
            problems.append(str(e))
    return problems + data_config_problems(config, check_paths=check_data)


def check_config(config, world_size: int | None = None, check_data: bool = True) -> None:
    if problems := config_problems(config, world_size, check_data):
        raise ConfigError("\n".join(problems))
