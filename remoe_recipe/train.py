"""Training entry point.

    torchrun --nproc_per_node N -m remoe_recipe.train --job.config_file train_configs/<run>.toml [--section.key value ...]
    python -m remoe_recipe.train --job.config_file ...          # one process, no torchrun

Before any process group starts: the config is parsed and checked (preflight.py, validate.py), the run folder
is locked and checked writable, the run is described in the log and its config.toml saved. Then the
recipe's Trainer (trainer.py) trains; every known failure ends in one log line and an exit status (2: config,
checkpoint or data error; 3: a non-finite value).
"""

import os
import signal
import socket
import sys

import torch
from torchtitan.tools.logging import init_logger, logger

import remoe_recipe  # noqa: F401  registers the `remoe` train spec
from remoe_recipe.config import ConfigError
from remoe_recipe.data.documents import DataError
from remoe_recipe.finiteness import NonFiniteError
from remoe_recipe.hf.hf_config import complete_last_hf_save
from remoe_recipe.infra.checkpoint_layout import CheckpointError
from remoe_recipe.infra.layout import resolve_layout
from remoe_recipe.load_checkpoint import RUN_CONFIG_FILE
from remoe_recipe.metrics import tensorboard_writer
from remoe_recipe.preflight import config_file, load_config
from remoe_recipe.run_folder import RunLock, check_writable
from remoe_recipe.run_log import describe_run, quiet_known_noise, rank_zero_only, save_config_toml
from remoe_recipe.trainer import STOP_SIGNALS, ReMoETrainer


def _single_process_env() -> None:
    """`python -m remoe_recipe.train` without torchrun: a world of one on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )


def _data_error_line(e: DataError) -> str:
    # Raised in a dataloader worker, the message holds the worker's traceback; ours is its last line.
    lines = [line for line in str(e).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last.split("DataError: ", 1)[-1]


def _newest_checkpoint(config) -> str:
    folder = os.path.join(config.job.dump_folder, config.checkpoint.folder)
    steps = sorted(
        int(name[5:]) for name in (os.listdir(folder) if os.path.isdir(folder) else [])
        if name.startswith("step-") and name[5:].isdigit() and os.path.isfile(os.path.join(folder, name, ".metadata"))
    )
    return f"newest checkpoint kept: {os.path.join(folder, f'step-{steps[-1]}')}" if steps else "no checkpoint saved"


def _take_run_folder(config) -> RunLock | None:
    """Before the process group: the checkpoint folder must be writable, and the dump folder free."""
    if config.checkpoint.enable:
        check_writable(os.path.join(config.job.dump_folder, config.checkpoint.folder))
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    lock = RunLock(config.job.dump_folder)
    lock.acquire()
    if lock.took_over:
        held = lock.took_over
        logger.warning(
            f"took over the stale lock {lock.path} of a run that is gone "
            f"(host {held.get('host')}, pid {held.get('pid')}, started {held.get('started')})"
        )
    return lock


def main(argv: list[str] | None = None) -> None:
    init_logger()
    quiet_known_noise(logger)
    argv = sys.argv[1:] if argv is None else argv
    lock: RunLock | None = None
    try:
        config = load_config(argv)
        rank_zero_only(logger, config)
        lock = _take_run_folder(config)
    except (ConfigError, FileNotFoundError) as e:
        for line in (e.lines() if isinstance(e, ConfigError) else [f"config error: {e}"]):
            logger.error(line)
        raise SystemExit(2) from None
    config_toml = None
    if int(os.environ.get("RANK", "0")) == 0:
        layout = resolve_layout(config.parallelism, int(os.environ.get("WORLD_SIZE", "1"))).describe()  # checked
        for line in describe_run(config, config_file(argv), layout):
            logger.info(line)
        config_toml = save_config_toml(config)
    if config.job.save_config_file is None:
        # RUN/job_config.json: export, evaluate and generate read the model's shape from it.
        config.job.save_config_file = RUN_CONFIG_FILE
    _single_process_env()
    trainer: ReMoETrainer | None = None
    try:
        trainer = ReMoETrainer(config)
        writer = tensorboard_writer(trainer.metrics_processor.logger)
        if writer is not None and config_toml is not None:
            writer.add_text("config", f"```toml\n{config_toml}\n```", 0)
        if config.checkpoint.create_seed_checkpoint:
            if int(os.environ["WORLD_SIZE"]) != 1 or not config.checkpoint.enable:
                raise ConfigError("checkpoint.create_seed_checkpoint needs one process and checkpoint.enable")
            trainer.checkpointer.save(curr_step=0, last_step=True)
        else:
            for sig in STOP_SIGNALS:
                signal.signal(sig, lambda signum, _frame: setattr(trainer, "signal_received", signum))
            trainer.train()
            if config.checkpoint.enable and config.checkpoint.last_save_in_hf and int(os.environ["RANK"]) == 0:
                # torchtitan writes the weights only; config, tokenizer and remote code complete the folder
                complete_last_hf_save(config, trainer.model_args, trainer.step)
    except CheckpointError as e:
        logger.error(f"checkpoint error: {e}")
        raise SystemExit(2) from None
    except ConfigError as e:
        for line in e.lines():
            logger.error(line)
        raise SystemExit(2) from None
    except DataError as e:
        logger.error(f"data error: {_data_error_line(e)}")
        raise SystemExit(2) from None
    except NonFiniteError as e:
        logger.error(f"{e}; {_newest_checkpoint(config)}. Lower optimizer.lr, or resume from an earlier step with --checkpoint.load_step N")
        raise SystemExit(3) from None
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    main()
