"""Optimizer and learning-rate schedule as the paper's Megatron runs set them up.

- Weight decay: Megatron (the paper's code) exempts biases and every 1-D parameter (RMSNorm weights)
  from weight decay (`megatron/core/optimizer/__init__.py`, `no_weight_decay_cond`); torchtitan 0.2.2
  decays every parameter. The recipe follows Megatron; `optimizer.decay_1d_params = true` restores
  torchtitan's decay-everything.
- Warmup: the paper warms up over a fraction of the run (`--lr-warmup-fraction 0.01`, 600 of 60k
  steps, paper §4.1). `lr_scheduler.warmup_fraction` expresses that (instead of
  `lr_scheduler.warmup_steps`), so a shorter run (the 20k-step ablations of Tables 3-4) keeps the
  paper's 1 %.
"""

import copy
from typing import Any

from torch import nn
from torchtitan.components.lr_scheduler import build_lr_schedulers
from torchtitan.components.optimizer import OptimizersContainer, build_optimizers
from torchtitan.tools.logging import logger

# The keyword arguments torchtitan's build_optimizers passes (torchtitan/components/optimizer.py).
_KWARGS = ("lr", "betas", "eps", "weight_decay", "fused", "foreach")


def decay_and_no_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable parameters split as Megatron does: >= 2-D weights decay, 1-D ones (norms, biases) do not."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return decay, no_decay


class ParamGroupOptimizersContainer(OptimizersContainer):
    """torchtitan's container with two parameter groups per model part: decayed and not decayed.
    Checkpoints keep torchtitan's flattened optimizer state dict (keyed by parameter name)."""

    def __init__(self, model_parts: list[nn.Module], optimizer_cls, optimizer_kwargs: dict[str, Any]):
        all_params = []
        self.optimizers = []
        self.model_parts = model_parts
        for model in model_parts:
            decay, no_decay = decay_and_no_decay(model)
            groups = [{"params": decay}]
            if no_decay:
                groups.append({"params": no_decay, "weight_decay": 0.0})
            self.optimizers.append(optimizer_cls(groups, **optimizer_kwargs))
            all_params.extend(decay + no_decay)
        self._validate_length(len(model_parts))
        self._post_init(all_params, optimizer_kwargs)


def build_remoe_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager=None):
    container = build_optimizers(model_parts, optimizer_config, parallel_dims, ft_manager)
    if getattr(optimizer_config, "decay_1d_params", False) or optimizer_config.weight_decay == 0:
        return container
    if type(container) is not OptimizersContainer:
        # Optimizer-in-backward and TorchFT keep torchtitan's own container (one group).
        raise ValueError(
            f"{type(container).__name__}: set optimizer.decay_1d_params = true; the no-decay parameter "
            "group is built for torchtitan's standard optimizer container only"
        )
    optimizer_cls = type(container.optimizers[0])
    kwargs = {k: v for k, v in container.optimizers[0].defaults.items() if k in _KWARGS}
    return ParamGroupOptimizersContainer(model_parts, optimizer_cls, kwargs)


def warmup_steps(lr_scheduler_config, training_steps: int) -> int:
    """The warmup length a run uses: `warmup_fraction` of the schedule's length when set."""
    fraction = getattr(lr_scheduler_config, "warmup_fraction", None)
    if fraction is None:
        return int(lr_scheduler_config.warmup_steps)
    total = lr_scheduler_config.total_steps or training_steps
    # Megatron: lr_warmup_steps = lr_warmup_fraction * lr_decay_steps.
    return max(1, int(fraction * total))


def build_remoe_lr_schedulers(optimizers, lr_scheduler_config, training_steps: int):
    config = copy.copy(lr_scheduler_config)
    config.warmup_steps = warmup_steps(lr_scheduler_config, training_steps)
    if getattr(lr_scheduler_config, "warmup_fraction", None) is not None:
        logger.info(
            f"Learning-rate warmup: {config.warmup_steps} steps "
            f"(lr_scheduler.warmup_fraction = {lr_scheduler_config.warmup_fraction})"
        )
    return build_lr_schedulers(optimizers, config, training_steps)

