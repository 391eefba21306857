"""A trained checkpoint as a model on one device: the loader that export, evaluate and generate share.

`--checkpoint` is a run's checkpoint folder (`RUN/checkpoint`, the latest step or `--step N`) or one
step folder (`RUN/checkpoint/step-N`). Any DCP checkpoint the recipe writes loads (one process, FSDP,
expert parallel; model-only or full): DCP stores global tensors, and only the model's keys are read.
Nothing under the checkpoint folder is written.

The model's shape comes from the run's configuration: `RUN/job_config.json`, which the trainer writes at
start-up, or, for a run without one, `--config TOML` with the run's overrides.
"""

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from remoe_recipe.config import MoEConfig
from remoe_recipe.data.tokenizer import TiktokenTokenizer, load_tokenizer
from remoe_recipe.model import ReMoEModelArgs, ReMoETransformer, remoe_flavors

RUN_CONFIG_FILE = "job_config.json"  # written by remoe_recipe.train into the run's dump folder
_STEP = re.compile(r"step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint path, step or shape is not what was expected; the message names it."""


@dataclass
class TrainedModel:
    model: ReMoETransformer
    args: ReMoEModelArgs
    tokenizer: TiktokenTokenizer
    tokenizer_spec: str
    step_dir: Path
    step: int | None  # None for a step folder not named step-N
    run_dir: Path | None  # the run's dump folder, where results are written
    job: dict  # the run's job configuration (torchtitan's JobConfig.to_dict())


def _has_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file()


def find_step_dir(checkpoint: str | os.PathLike, step: int | None = None) -> tuple[Path, int | None]:
    path = Path(checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"--checkpoint {path}: no such folder")
    match = _STEP.match(path.name)
    if _has_checkpoint(path):
        if step is not None and (match is None or int(match.group(1)) != step):
            raise CheckpointError(f"--checkpoint {path} is one step folder; --step {step} needs the folder above it")
        return path, int(match.group(1)) if match else None
    steps = sorted(
        int(m.group(1)) for child in path.iterdir() if (m := _STEP.match(child.name)) and _has_checkpoint(child)
    )
    if not steps:
        raise CheckpointError(
            f"--checkpoint {path}: holds no checkpoint (expected step-N folders with a DCP .metadata file)"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"--checkpoint {path}: no step {step}; the saved steps are {steps}")
    return path / f"step-{step}", step


def run_dir_of(step_dir: Path) -> Path | None:
    """RUN for RUN/checkpoint/step-N (the checkpoint folder's parent), if it looks like a run."""
    if _STEP.match(step_dir.name):
        return step_dir.parent.parent
    return None


def job_config(step_dir: Path, config: str | None = None, overrides: list[str] | tuple = ()) -> dict:
    """The run's configuration: from `--config` (+ overrides) if given, else RUN/job_config.json, else the
    resolved RUN/config.toml (both written by the trainer)."""
    run = run_dir_of(step_dir)
    if config is None and run is not None and not (run / RUN_CONFIG_FILE).is_file() and (run / "config.toml").is_file():
        config = str(run / "config.toml")
    if config is not None:
        from remoe_recipe.config import ConfigError
        from remoe_recipe.preflight import load_config

        try:
            return load_config(["--job.config_file", config, *overrides], check_data=False).to_dict()
        except (ConfigError, FileNotFoundError) as e:
            raise CheckpointError(f"--config {config}: {e}") from None
    path = run / RUN_CONFIG_FILE if run else None
    if path is None or not path.is_file():
        raise CheckpointError(
            f"{path or step_dir}: no run configuration found (the trainer writes {RUN_CONFIG_FILE} into the run "
            "folder); pass the run's TOML with --config, and its overrides after --"
        )
    return json.loads(path.read_text())


def model_args_from_job(job: dict, tokenizer: TiktokenTokenizer) -> ReMoEModelArgs:
    model = job.get("model", {})
    flavors = remoe_flavors()
    if model.get("name") != "remoe" or model.get("flavor") not in flavors:
        raise CheckpointError(
            f"model.name = {model.get('name')!r}, model.flavor = {model.get('flavor')!r}: expected the 'remoe' "
            f"model with a flavor in {sorted(flavors)}"
        )
    args = flavors[model["flavor"]]
    known = {f.name for f in dataclasses.fields(MoEConfig)}
    moe = MoEConfig(**{k: v for k, v in job.get("moe", {}).items() if k in known})
    namespace = SimpleNamespace(moe=moe, training=SimpleNamespace(seq_len=job["training"]["seq_len"]))
    args.update_from_config(namespace, tokenizer_vocab_size=tokenizer.get_vocab_size())
    return args


def check_shapes(model: torch.nn.Module, step_dir: Path, job: dict) -> None:
    saved = {
        k: tuple(md.size) for k, md in FileSystemReader(str(step_dir)).read_metadata().state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    moe = job.get("moe", {})
    described = (
        f"flavor {job['model']['flavor']!r}, router {moe.get('router')!r}, {moe.get('num_experts')} experts, "
        f"granularity {moe.get('granularity')}"
    )
    for name, tensor in model.state_dict().items():
        if name not in saved:
            raise CheckpointError(f"{step_dir}: has no tensor {name}: not a checkpoint of the model ({described})")
        if saved[name] != tuple(tensor.shape):
            raise CheckpointError(
                f"{step_dir}: {name} is {list(saved[name])} in the checkpoint, {list(tensor.shape)} for the "
                f"configured model ({described}): a checkpoint of another model shape"
            )


def load_trained_model(
    checkpoint: str | os.PathLike,
    step: int | None = None,
    config: str | None = None,
    overrides: list[str] | tuple = (),
    tokenizer_path: str | None = None,
    device: torch.device | str = "cpu",
) -> TrainedModel:
    """The checkpoint's model in eval mode on `device` (fp32, as checkpoints store it)."""
    step_dir, step = find_step_dir(checkpoint, step)
    job = job_config(step_dir, config, overrides)
    spec = tokenizer_path or job.get("model", {}).get("tokenizer_path") or "builtin"
    try:
        tokenizer = load_tokenizer(spec)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{e} (pass --tokenizer PATH for the run's tokenizer)") from None
    args = model_args_from_job(job, tokenizer)
    with torch.device("meta"):
        model = ReMoETransformer(args)
    check_shapes(model, step_dir, job)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.init_weights(buffer_device=torch.device("cpu"))  # also the RoPE buffer
    state = model.state_dict()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(state, checkpoint_id=str(step_dir))  # reads only the model's keys; writes nothing
    model.load_state_dict(state)
    model = model.to(device).eval()
    return TrainedModel(model, args, tokenizer, spec, step_dir, step, run_dir_of(step_dir), job)
