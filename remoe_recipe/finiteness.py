"""Stop a run at the first non-finite value, before anything of that step is saved.

Checked once per step, after the backward passes and before the optimizer step: the step's loss, the
gradient norm (all-reduced by torchtitan's clipping) and every MoE layer's router statistics (gate L1 /
load-balancing term and sparsity, all-reduced with the routing statistics). The values are packed into
one tensor and read back in ONE host transfer per step, never per micro-batch. The check runs where the
step's values already exist on the device; torchtitan reads the loss and the gradient norm to the host at
logged steps anyway.

On failure the message names the step and the first non-finite tensor in forward order: a weight (named
by parameter), then a layer's router (NaN gates make its loss term NaN), then the loss, then the gradient
norm. The exception leaves the training loop before `checkpointer.save` runs for the step, so no
non-finite checkpoint is written and `keep_latest_k` never deletes the last good ones.
"""

import math

import torch
from torch import nn


class NonFiniteError(RuntimeError):
    """A training value went NaN or infinite; the message is one line naming the step and the culprit."""


def step_values(
    loss: torch.Tensor, grad_norm: torch.Tensor, layer_terms: torch.Tensor | None,
    layer_sparsity: torch.Tensor | None,
) -> torch.Tensor:
    """The step's checked values packed into one 1-d fp32 tensor: [loss, grad norm, terms..., sparsities...]."""
    parts = [loss.detach().float().reshape(1), _local(grad_norm).detach().float().reshape(1)]
    if layer_terms is not None:
        parts += [layer_terms.detach().float().flatten(), layer_sparsity.detach().float().flatten()]
    return torch.cat([p.to(parts[0].device) for p in parts])


def describe_non_finite(
    step: int, values: list[float], num_layers: int, model_parts: list[nn.Module]
) -> str | None:
    """None if every value is finite, else the one-line reason (the first culprit in forward order)."""
    if all(math.isfinite(v) for v in values):
        return None
    loss, grad_norm = values[0], values[1]
    terms = values[2 : 2 + num_layers]
    sparsity = values[2 + num_layers : 2 + 2 * num_layers]
    weight = first_non_finite_parameter(model_parts)
    if weight is not None:
        culprit = f"weight {weight} is non-finite"
    else:
        bad_layer = next(
            (i for i in range(len(terms)) if not (math.isfinite(terms[i]) and math.isfinite(sparsity[i]))), None
        )
        if bad_layer is not None:
            culprit = (
                f"layer {bad_layer} router: gates are non-finite (router loss term = {terms[bad_layer]}, "
                f"sparsity = {sparsity[bad_layer]})"
            )
        elif not math.isfinite(loss):
            culprit = f"the loss is {loss}"
        else:
            culprit = f"the gradient norm is {grad_norm} (loss {loss:.4g} and router statistics finite)"
    return (
        f"non-finite training value at step {step}: {culprit}; loss = {loss}, grad norm = {grad_norm}. "
        f"Stopped before saving step {step}"
    )


def first_non_finite_parameter(model_parts: list[nn.Module]) -> str | None:
    """Name of the first parameter (model order) with a NaN/inf in this rank's shard; the failure path only."""
    for part in model_parts:
        for name, param in part.named_parameters():
            if not torch.isfinite(_local(param.detach())).all():
                return name
    return None


def first_non_finite_state(state: dict, prefix: str = "") -> str | None:
    """Key of the first tensor with a NaN/inf in a (nested) state dict, this rank's shards only."""
    tensors = []
    for key, value in _flatten(state, prefix):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            tensors.append((key, _local(value)))
    if not tensors:
        return None
    # One reduction per tensor on the device, one host transfer for all of them.
    finite = torch.stack([torch.isfinite(t).all().to(tensors[0][1].device) for _, t in tensors]).tolist()
    return next((key for (key, _), ok in zip(tensors, finite) if not ok), None)


def _flatten(state, prefix: str):
    if isinstance(state, dict):
        for key, value in state.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            yield from _flatten(value, f"{prefix}.{i}")
    else:
        yield prefix, state


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
