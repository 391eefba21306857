"""ReMoE's adaptive L1 coefficient (paper Eq. 7; official code: megatron/training/training.py).

After every optimizer step: lambda <- lambda * alpha if the step's sparsity S is below the target
1 - k/E, else lambda / alpha. lambda is a 0-d fp32 tensor on the training device, so the update needs
no host synchronisation; every rank computes it from the same all-reduced S and so holds the same value.

`num_layers` (opt-in `[moe] l1_coeff_per_layer`, not in the paper): one lambda per MoE layer, a vector
updated elementwise from the per-layer sparsities by the same rule.
"""

import torch


class L1CoefficientController:
    def __init__(
        self, init: float, multiplier: float, target_sparsity: float, device: torch.device,
        num_layers: int | None = None,
    ):
        if not init > 0 or not multiplier > 1:
            raise ValueError(f"need l1_coeff_init > 0 and l1_coeff_multiplier > 1, got {init}, {multiplier}")
        self.multiplier = float(multiplier)
        self.target_sparsity = float(target_sparsity)
        shape = () if num_layers is None else (num_layers,)
        self.coeff = torch.full(shape, init, dtype=torch.float32, device=device)

    def update(self, sparsity: torch.Tensor) -> None:
        """One step of the bang-bang rule, from the step's global sparsity (a 0-d tensor), or per layer
        ([L], with one lambda per layer)."""
        below_target = sparsity.to(self.coeff.device) < self.target_sparsity
        self.coeff = torch.where(
            below_target, self.coeff * self.multiplier, self.coeff / self.multiplier
        )

    def state_dict(self) -> dict[str, float]:
        # A Python float holds an fp32 value exactly, and checkpoints store it without sharding.
        if self.coeff.dim() == 0:
            return {"l1_coeff": float(self.coeff.item())}
        return {f"l1_coeff_layer_{i}": v for i, v in enumerate(self.coeff.tolist())}

    def load_state_dict(self, state: dict[str, float]) -> None:
        if self.coeff.dim() == 0:
            values = state["l1_coeff"]
        else:
            values = [state[f"l1_coeff_layer_{i}"] for i in range(self.coeff.numel())]
        self.coeff = torch.tensor(values, dtype=torch.float32, device=self.coeff.device)
