"""ReMoE (paper §3): ReLU routing trained with an adaptive, load-balance-aware L1 penalty.

- ReLURouter (Eq. 5): gates = ReLU(x W). No softmax, no bias, no renormalisation; a token may use any
  number of experts, including none. Its loss term is the L1 of Eq. 9, or the load-balance-aware L1 of
  Eq. 10 with f treated as a constant.
- AdaptiveL1Objective: the penalty λ · mean over layers of the loss terms (Eq. 6/10's 1/L; the official
  code sums the layers, so its λ is the paper's λ / L), with λ multiplied or divided by α after every step
  (Eq. 7, sparsity.py), and the training stages of §3.5 tracked for TensorBoard.
"""

import torch
import torch.nn.functional as F
from torch import nn

from remoe_recipe.routers.objective import RouterObjective
from remoe_recipe.routers.registry import PaperRow, RouterSpec, register_router
from remoe_recipe.routers.routing import Router, Routing, load_balance_weights
from remoe_recipe.sparsity import L1CoefficientController

# Stage II begins when λ · L1 first reaches this fraction of the LM loss (the penalty starts to matter).
STAGE2_PENALTY_RATIO = 1e-3


class ReLURouter(Router):
    def __init__(self, dim: int, num_experts: int, top_k: int, load_balance: bool):
        super().__init__(num_experts, top_k)  # top_k only enters f in Eq. 10 (k * G at granularity G)
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.load_balance = load_balance

    def num_pairs(self, num_tokens: int) -> None:
        return None  # variable: 0..N experts per token

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        gates = F.relu(self.gate(x).float())
        mask = gates > 0
        num_tokens = max(x.shape[0], 1)
        if self.load_balance:
            f = load_balance_weights(mask, self.top_k)  # Eq. 10
            loss_term = (gates.sum(dim=0) * f).sum() / num_tokens
        else:
            loss_term = gates.sum() / num_tokens  # Eq. 9
        return Routing(gates=gates, mask=mask, loss_term=loss_term)


class StageTracker:
    """ReMoE's training stages (§3.5, Fig. 4): I (dense) until λ · L1 first reaches STAGE2_PENALTY_RATIO of
    the LM loss; II (sparsifying) until the sparsity first reaches the target 1 - k/E; III (stable)
    afterwards. The step stage III begins is the paper's settling time. Device tensors only."""

    def __init__(self, target_sparsity: float, device):
        self.target_sparsity = target_sparsity
        self.stage2_step = torch.tensor(-1, device=device)
        self.stage3_step = torch.tensor(-1, device=device)

    def observe(self, step: int, stats, l1_coeff: torch.Tensor) -> None:
        step_t = torch.tensor(step, device=self.stage2_step.device)
        penalty_matters = l1_coeff * stats.loss_term >= STAGE2_PENALTY_RATIO * stats.lm_loss
        at_target = stats.sparsity >= self.target_sparsity
        # A run that reaches the target first (e.g. a large λ0) skips straight to stage III.
        enter2 = (self.stage2_step < 0) & (penalty_matters | at_target)
        self.stage2_step = torch.where(enter2, step_t, self.stage2_step)
        self.stage3_step = torch.where((self.stage3_step < 0) & at_target, step_t, self.stage3_step)


class AdaptiveL1Objective(RouterObjective):
    def __init__(self, args, device):
        super().__init__(args, device)
        moe = args.moe
        self.controller = L1CoefficientController(
            moe.l1_coeff_init, moe.l1_coeff_multiplier, args.target_sparsity, device
        )
        self.stages = StageTracker(args.target_sparsity, device)
        self.coeff_used = self.controller.coeff  # the λ of the last step, for its metrics

    def loss_coeff(self) -> torch.Tensor:
        return self.controller.coeff

    def reduce_layers(self, layer_terms: torch.Tensor) -> torch.Tensor:
        return layer_terms.mean()

    def after_step(self, step: int, stats) -> None:
        self.coeff_used = self.controller.coeff
        self.stages.observe(step, stats, self.coeff_used)
        self.controller.update(stats.sparsity)

    def log_tensors(self, stats) -> dict[str, torch.Tensor]:
        return {
            "remoe/l1_coeff": self.coeff_used,
            "remoe/l1_loss": stats.loss_term,
            "remoe/penalty": self.coeff_used * stats.loss_term,
            "remoe/stage2_step": self.stages.stage2_step,
            "remoe/settling_step": self.stages.stage3_step,
        }

    def scalars(self, values: dict[str, float]) -> dict[str, float]:
        stage2, stage3 = values.pop("remoe/stage2_step"), values.pop("remoe/settling_step")
        values["remoe/stage"] = 3.0 if stage3 >= 0 else 2.0 if stage2 >= 0 else 1.0
        if stage3 >= 0:
            values["remoe/settling_step"] = stage3
        return values

    def state_dict(self) -> dict[str, float]:
        # The keys of the checkpoints written before the registry (λ, and the stage tracker so that
        # settling_step survives a resume).
        return {
            **self.controller.state_dict(),
            "stage2_step": int(self.stages.stage2_step.item()),
            "stage3_step": int(self.stages.stage3_step.item()),
        }

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.controller.load_state_dict(state)
        device = self.stages.stage2_step.device
        self.stages.stage2_step = torch.tensor(int(state["stage2_step"]), device=device)
        self.stages.stage3_step = torch.tensor(int(state["stage3_step"]), device=device)
        self.coeff_used = self.controller.coeff


def _check(moe) -> list[str]:
    problems = []
    if not moe.l1_coeff_init > 0:
        problems.append(f"moe.l1_coeff_init = {moe.l1_coeff_init}: expected > 0")
    if not moe.l1_coeff_multiplier > 1:
        problems.append(f"moe.l1_coeff_multiplier = {moe.l1_coeff_multiplier}: expected > 1")
    return problems


SPEC = register_router(RouterSpec(
    name="relu",
    summary="ReMoE: gates = ReLU(x W), sparsity held at 1 - k/E by the adaptive L1 penalty (paper §3)",
    build=lambda args, layer_id: ReLURouter(
        args.dim, args.num_routed_experts, args.routed_top_k, args.moe.load_balance
    ),
    objective=AdaptiveL1Objective,
    config_keys=("l1_coeff_init", "l1_coeff_multiplier", "load_balance", "router_init_std"),
    check=_check,
    variable_pairs=True,
    # ReLU gates of a fresh router are open for about half the experts (Fig. 4: stage I is dense).
    start_experts_per_token=lambda args: args.num_routed_experts / 2,
    paper_table2=PaperRow("ReMoE (paper)", (20.22, 46.68, 54.16, 30.26, 35.94, 63.55, 29.38), 40.03),
    hf_remote_code=True,
))
