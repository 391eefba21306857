"""What a run tells its user: who logs, what the first lines say, progress with an ETA, the saved config.

- Rank 0 logs; the other ranks log errors only, unless `[metrics] log_all_ranks = true`.
- The first lines name the config file, dump folder, training/validation data, tokenizer and parallel layout.
- The resolved configuration (defaults < TOML < command line) is saved as `<dump_folder>/config.toml`
  (a complete TOML: `--job.config_file <dump_folder>/config.toml` repeats the run) and as TensorBoard text.
- Each run writes TensorBoard events into its own folder `<dump>/<save_tb_folder>/<YYYYmmdd-HHMMSS>`
  (torchtitan names it by the minute, so a resume started in the same minute would mix into the
  previous run's folder); rank 0 picks the name and every rank uses it.
- Messages torchtitan emits that do not apply to this recipe are dropped (KNOWN_NOISE): the recipe reads
  its tokenizer from `model.tokenizer_path` and no Hugging Face assets, and on CPU there is no GPU peak.
"""

import contextlib
import datetime
import logging
import os
import time
import warnings

import torch.distributed as dist

from remoe_recipe.show_config import format_resolved

CONFIG_TOML = "config.toml"
KNOWN_NOISE = (
    "HF assets path ",  # model.hf_assets_path: the recipe has no Hugging Face assets
    "tokenizer_path is deprecated",  # torchtitan's; the recipe's tokenizer key is model.tokenizer_path
    "model.safetensors.index.json not found at hf_assets_path",
    "Error running lspci",  # the GPU-peak lookup on machines without lspci (CPU)
    "Peak flops undefined for: cpu",
)


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(message.startswith(prefix) for prefix in KNOWN_NOISE)


_NOISE_FILTER = _DropKnownNoise()


def quiet_known_noise(logger: logging.Logger) -> None:
    logger.addFilter(_NOISE_FILTER)  # the same instance: adding it again is a no-op
    # Python warnings torchtitan triggers on every CPU run (fp32 autocast) and torchdata on import.
    warnings.filterwarnings("ignore", message="In CPU autocast, but the target dtype is not supported")
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated")


def rank_zero_only(logger: logging.Logger, config) -> None:
    if int(os.environ.get("RANK", "0")) != 0 and not config.metrics.log_all_ranks:
        logger.setLevel(logging.ERROR)


def describe_run(config, config_file: str | None, layout: str) -> list[str]:
    from remoe_recipe.data.config import data_config

    data = data_config(config)
    training = f"mix {data.mix}" if data.mix else (config.training.dataset_path or config.training.dataset)
    validation = (
        (config.validation.dataset_path or config.validation.dataset) if config.validation.enable else "off"
    )
    tokenizer = getattr(config.model, "tokenizer_path", None) or "builtin"
    return [
        f"Run: config {config_file}, dump folder {config.job.dump_folder}, {config.training.steps} steps",
        f"Data: training {training!r}, validation {validation!r}, tokenizer {tokenizer!r}, "
        f"sequence length {config.training.seq_len}",
        f"Parallel layout: {layout}",
    ]


def save_config_toml(config) -> str:
    """Write the resolved config into the dump folder; returns the TOML text."""
    text = format_resolved(config)
    os.makedirs(config.job.dump_folder, exist_ok=True)
    path = os.path.join(config.job.dump_folder, CONFIG_TOML)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
    return text


class Progress:
    """'step N/total (p %), ETA h:mm:ss' from the wall time since the first step of this process
    (the first step, with compilation and warm-up, is not counted in the rate)."""

    def __init__(self, total: int):
        self.total = total
        self.first: tuple[int, float] | None = None

    def __call__(self, step: int) -> str:
        now = time.monotonic()
        if self.first is None:
            self.first = (step, now)
        text = f"step {step}/{self.total} ({100 * step / self.total:.0f} %)"
        done = step - self.first[0]
        if done > 0:
            eta = (now - self.first[1]) / done * (self.total - step)
            text += f", ETA {datetime.timedelta(seconds=round(eta))}"
        return text


def unique_tensorboard_name(config) -> str:
    """On rank 0: a folder name under the TensorBoard folder that no earlier run used."""
    base = os.path.join(config.job.dump_folder, config.metrics.save_tb_folder)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name, n = stamp, 1
    while os.path.exists(os.path.join(base, name)):
        n += 1
        name = f"{stamp}-{n}"
    return name


def agreed_tensorboard_name(config) -> str:
    """Rank 0's unique name, broadcast to every rank (all ranks must call this)."""
    name = [unique_tensorboard_name(config) if not dist.is_initialized() or dist.get_rank() == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(name, src=0)
    return name[0]


@contextlib.contextmanager
def tensorboard_folder_named(name: str):
    """torchtitan's metric logger names its folder `datetime.now().strftime(...)`: give it `name` instead."""
    import torchtitan.components.metrics as titan_metrics

    class _Named:
        @staticmethod
        def now():
            return _Named()

        def strftime(self, _format: str) -> str:
            return name

    real = titan_metrics.datetime
    titan_metrics.datetime = _Named
    try:
        yield
    finally:
        titan_metrics.datetime = real
