"""Will the checkpoint this run resumes from fit its model? Checked at start-up, before any weight is read.

torchtitan checkpoints are DCP checkpoints: every parameter is stored as its global tensor, in the
chunks the saving ranks held. Loading reshards those chunks into whatever layout the loading run has
(any FSDP / HSDP degree, any expert-parallel degree: experts are DTensors `Shard(0)` on the `ep` mesh,
so each chunk knows which experts it holds). What cannot load is a different model: another number
of experts per layer, another expert width (granularity), another flavor. DCP would stop on the first
size mismatch deep inside its planner; this check stops earlier and names both sides: the saved run
(ranks, expert shape) and this run (layout, expert shape), and every parameter that differs.
"""

import os
import re

from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

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


def _saved_ranks(path: str) -> int:
    ranks = {m.group(1) for name in os.listdir(path) if (m := re.match(r"__(\d+)_\d+\.distcp$", name))}
    return len(ranks)


def _shape(size) -> str:
    return "[" + ", ".join(str(s) for s in size) + "]"


def check_checkpoint_fits(model: nn.Module, path: str, layout: Layout) -> None:
    """Raise ConfigError naming both layouts if the model's parameters do not match the checkpoint."""
    tensors = {
        fqn: md for fqn, md in FileSystemReader(path).read_metadata().state_dict_metadata.items()
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
        "expert width and model.flavor must match the saved run; the parallel layout may differ"
    )
