"""ReMoE's adaptive L1 coefficient (paper Eq. 7; official code: megatron/training/training.py).

After every optimizer step: lambda <- lambda * alpha if the step's sparsity S is below the target
1 - k/E, else lambda / alpha. lambda is a 0-d fp32 tensor on the training device, so the update needs
no host synchronisation; every rank computes it from the same all-reduced S and so holds the same value.
"""

import torch


class L1CoefficientController:
    def __init__(self, init: float, multiplier: float, target_sparsity: float, device: torch.device):
        if not init > 0 or not multiplier > 1:
            raise ValueError(f"need l1_coeff_init > 0 and l1_coeff_multiplier > 1, got {init}, {multiplier}")
        self.multiplier = float(multiplier)
        self.target_sparsity = float(target_sparsity)
        self.coeff = torch.tensor(init, dtype=torch.float32, device=device)

    def update(self, sparsity: torch.Tensor) -> None:
        """One step of the bang-bang rule, from the step's global sparsity (a 0-d tensor)."""
        below_target = sparsity.to(self.coeff.device) < self.target_sparsity
        self.coeff = torch.where(
            below_target, self.coeff * self.multiplier, self.coeff / self.multiplier
        )

    def state_dict(self) -> dict[str, float]:
        # A Python float holds an fp32 value exactly, and checkpoints store it without sharding.
        return {"l1_coeff": float(self.coeff.item())}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.coeff = torch.tensor(state["l1_coeff"], dtype=torch.float32, device=self.coeff.device)
