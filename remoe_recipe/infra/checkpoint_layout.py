"""Will the checkpoint this run resumes from fit its model? Checked at start-up, before any weight is read.

torchtitan checkpoints are DCP checkpoints: every parameter is stored as its global tensor, in the
chunks the saving ranks held. Loading reshards those chunks into whatever layout the loading run has
(any FSDP / HSDP degree, any expert-parallel degree: experts are DTensors `Shard(0)` on the `ep` mesh,
so each chunk knows which experts it holds). What cannot load is a different model: another number
of experts per layer, another expert width (granularity), another flavor. DCP would stop on the first
size mismatch deep inside its planner; this check stops earlier and names both sides: the saved run
(ranks, expert shape) and this run (layout, expert shape), and every parameter that differs.

Before the checkpoint is read (`check_resume`), also: the metadata and every shard are present and long
enough (a truncated file would otherwise end in a bare EOFError); the run identity stored in the train
state (router, experts per layer E*G, granularity G) matches this run; the data loader's positions were
saved for this run's number of data-parallel ranks. Each failure is one line naming the step folder,
what differs, and the option that helps.
"""

import os
import re
import warnings

import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from remoe_recipe.config import ConfigError
from remoe_recipe.infra.layout import Layout

_STEP = re.compile(r"step-(\d+)$")


def checkpoint_fqn(name: str) -> str:
    """A parameter's name as checkpoints store it: without the wrappers that activation
    checkpointing and torch.compile insert (as torch.distributed.checkpoint strips them)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name


def checkpoint_to_resume(checkpoint_config, dump_folder: str) -> str | None:
    """The DCP directory torchtitan's CheckpointManager.load will read, or None (same rules)."""
    if not checkpoint_config.enable:
        return None
    folder = os.path.join(dump_folder, checkpoint_config.folder)
    if not os.path.exists(folder):
        path = checkpoint_config.initial_load_path
        if path and not checkpoint_config.initial_load_in_hf and os.path.isdir(path):
            return path
        return None
    step = checkpoint_config.load_step
    if step == -1:
        steps = [
            int(m.group(1)) for name in os.listdir(folder)
            if (m := _STEP.match(name)) and os.path.isfile(os.path.join(folder, name, ".metadata"))
        ]
        if not steps:
            return None
        step = max(steps)
    path = os.path.join(folder, f"step-{step}")
    return path if os.path.isfile(os.path.join(path, ".metadata")) else None


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from; the message is one line naming the step folder."""


def saved_steps(checkpoint_folder: str) -> list[int]:
    if not os.path.isdir(checkpoint_folder):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(checkpoint_folder) if (m := _STEP.match(name)))


def other_steps_hint(path: str) -> str:
    """'--checkpoint.load_step N' with the other saved steps, for the end of a message."""
    folder, name = os.path.split(os.path.normpath(path))
    m = _STEP.match(name)
    others = [s for s in saved_steps(folder) if not m or s != int(m.group(1))]
    if others:
        return f"resume from another step with --checkpoint.load_step N (saved: {', '.join(map(str, others))})"
    return "no other step is saved; delete the folder to start over"


def read_metadata(path: str) -> Metadata:
    try:
        return FileSystemReader(path).read_metadata()
    except Exception as e:  # a torn or foreign .metadata: pickle, EOF or OS errors
        raise CheckpointError(
            f"checkpoint {path}: its .metadata cannot be read ({type(e).__name__}: {first_line(e)}); "
            f"{other_steps_hint(path)}"
        ) from None


def check_shards_complete(path: str, metadata: Metadata) -> None:
    """Every stored item lies inside its file: catches truncated or missing shard files."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(needed.items()):
        file = os.path.join(path, name)
        size = os.path.getsize(file) if os.path.isfile(file) else None
        if size is None or size < end:
            what = "is missing" if size is None else f"is truncated ({size:,} of at least {end:,} bytes)"
            raise CheckpointError(f"checkpoint {path}: shard {name} {what}; {other_steps_hint(path)}")


def read_saved_values(path: str, metadata: Metadata, prefix: str) -> dict:
    """The non-tensor entries under `prefix.` (e.g. the train state), read without a process group."""
    keys = [k for k in metadata.state_dict_metadata if k.startswith(prefix + ".")
            and not isinstance(metadata.state_dict_metadata[k], TensorStorageMetadata)]
    values = {k: None for k in keys}
    if values:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(values, checkpoint_id=path, no_dist=True)
    return {k[len(prefix) + 1:]: v for k, v in values.items()}


def check_resume(path: str, identity: dict, dp_degree: int, excluded: list[str], model_only: bool) -> dict:
    """Before torchtitan loads `path`: shards complete, same run identity, same data-parallel degree.
    Returns the saved train state (identity and trackers) for the caller's messages."""
    metadata = read_metadata(path)
    check_shards_complete(path, metadata)
    if model_only:
        return {}
    if "train_state.step" not in metadata.state_dict_metadata:
        raise CheckpointError(
            f"checkpoint {path} holds only model weights (a last-step save with checkpoint.last_save_model_only), "
            f"so training cannot resume from it; {other_steps_hint(path)}, or start a new job.dump_folder with "
            f"--checkpoint.initial_load_path {path}"
        )
    saved = read_saved_values(path, metadata, "train_state") if "train_state" not in excluded else {}
    if "train_state" not in excluded:
        differ = [
            f"{key} {saved[key]!r} there, {value!r} here"
            for key, value in identity.items() if key in saved and saved[key] != value
        ]
        missing = [key for key in identity if key not in saved]
        if differ or missing:
            what = "; ".join(differ) if differ else f"no {', '.join(missing)} in its train state (an older recipe)"
            raise CheckpointError(
                f"checkpoint {path} was saved by another kind of run: {what}. Set the run's [moe] options to match, "
                f"use a new job.dump_folder, or load it anyway with --checkpoint.exclude_from_loading train_state"
            )
    if "dataloader" not in excluded:
        ranks = sorted(
            int(m.group(1)) for k in metadata.state_dict_metadata if (m := re.match(r"dataloader\.dp_rank_(\d+)$", k))
        )
        if ranks and len(ranks) != dp_degree:
            raise CheckpointError(
                f"checkpoint {path} holds the data order of {len(ranks)} data-parallel ranks, this run has "
                f"{dp_degree}: the position in the data cannot be re-sharded; resume on {len(ranks)} data-parallel "
                f"ranks, or restart the data order with --checkpoint.exclude_from_loading dataloader"
            )
    return saved


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def _saved_ranks(path: str) -> int:
    ranks = {m.group(1) for name in os.listdir(path) if (m := re.match(r"__(\d+)_\d+\.distcp$", name))}
    return len(ranks)


def _shape(size) -> str:
    return "[" + ", ".join(str(s) for s in size) + "]"


def check_checkpoint_fits(model: nn.Module, path: str, layout: Layout) -> None:
    """Raise ConfigError naming both layouts if the model's parameters do not match the checkpoint."""
    tensors = {
        fqn: md for fqn, md in read_metadata(path).state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    problems, experts_here, experts_saved = [], None, None
    for name, param in model.named_parameters():
        fqn = checkpoint_fqn(name)
        here = tuple(param.shape)  # a DTensor's shape is the global one
        if experts_here is None and fqn.endswith("moe.experts.w1"):
            experts_here = (fqn, here)
            if fqn in tensors:
                experts_saved = (fqn, tuple(tensors[fqn].size), len(tensors[fqn].chunks))
        if fqn not in tensors:
            problems.append(f"{fqn} is not in the checkpoint")
        elif tuple(tensors[fqn].size) != here:
            problems.append(f"{fqn} is {_shape(tensors[fqn].size)} there, {_shape(here)} here")
    if not problems:
        return
    saved = f"saved by {_saved_ranks(path)} ranks"
    if experts_saved:
        saved += f", experts w1 {_shape(experts_saved[1])} in {experts_saved[2]} shards"
    current = f"this run: {layout.describe()}"
    if experts_here:
        current += f", experts w1 {_shape(experts_here[1])}"
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    raise ConfigError(
        f"checkpoint {path} ({saved}) cannot be loaded by {current}: "
        f"{'; '.join(problems[:3])}{more}. The expert count (moe.num_experts x moe.granularity), "
        "expert width and model.flavor must match the saved run (its config.toml has them); the parallel layout "
        "may differ. Use the saved run's options, or a new job.dump_folder to start over"
    )
