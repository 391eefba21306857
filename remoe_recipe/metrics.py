"""Routing metrics for TensorBoard: what the router does, per layer, at every logged step.

Fed every step with the step's reduced statistics (already summed over micro-batches and data-parallel
ranks), it keeps everything on the device; at a logged step it reads all values back in ONE transfer.

Definitions (also in docs/observability.md):
- sparsity: fraction of zero gates (paper Eq. 8); active experts per token = (1 - sparsity) * N.
- expert load: (token, expert) pairs routed to each expert over the logging window; shown relative to
  the fair share (the layer's pairs / N), so 1 is perfectly balanced. Imbalance = max / mean load.
- dead expert: load below DEAD_EXPERT_FRACTION of the fair share over the logging window.
- ReMoE stage: I (dense) until lambda * L1 first reaches STAGE2_PENALTY_RATIO of the LM loss; II
  (sparsifying) until sparsity first reaches the target 1 - k/E; III (stable) afterwards. The step at
  which stage III starts is the paper's "settling time".
"""

import torch

from remoe_recipe.routing_stats import ReducedRoutingStats

DEAD_EXPERT_FRACTION = 0.1
STAGE2_PENALTY_RATIO = 1e-3


class RoutingMonitor:
    def __init__(self, num_layers: int, num_experts: int, target_sparsity: float | None, device):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.target_sparsity = target_sparsity  # None: TopK (sparsity is fixed, no stages)
        self.window_load = torch.zeros(num_layers, num_experts, device=device)
        self.stage2_step = torch.tensor(-1, device=device)
        self.stage3_step = torch.tensor(-1, device=device)

    def state_dict(self) -> dict[str, int]:
        """The stage tracker, for the checkpoint's train state (so settling_step survives a resume)."""
        return {"stage2_step": int(self.stage2_step.item()), "stage3_step": int(self.stage3_step.item())}

    def load_state_dict(self, state: dict[str, int]) -> None:
        device = self.stage2_step.device
        self.stage2_step = torch.tensor(int(state["stage2_step"]), device=device)
        self.stage3_step = torch.tensor(int(state["stage3_step"]), device=device)

    def observe(self, step: int, stats: ReducedRoutingStats, l1_coeff: torch.Tensor | None) -> None:
        """Every step, device-only (no host synchronisation)."""
        self.window_load += stats.tokens_per_expert
        if self.target_sparsity is None or l1_coeff is None:
            return
        step_t = torch.tensor(step, device=self.stage2_step.device)
        penalty_matters = l1_coeff * stats.loss_term >= STAGE2_PENALTY_RATIO * stats.lm_loss
        at_target = stats.sparsity >= self.target_sparsity
        # A run that reaches the target first (e.g. a large lambda_0) skips straight to stage III.
        enter2 = (self.stage2_step < 0) & (penalty_matters | at_target)
        self.stage2_step = torch.where(enter2, step_t, self.stage2_step)
        self.stage3_step = torch.where((self.stage3_step < 0) & at_target, step_t, self.stage3_step)

    def collect(self, stats: ReducedRoutingStats, l1_coeff: torch.Tensor | None):
        """At a logged step: (scalars, relative expert load: L * N floats, layer-major, 1 = the fair share).
        Resets the logging window. `load_image` draws the relative load for TensorBoard."""
        L, N = self.num_layers, self.num_experts
        load = self.window_load
        fair = load.sum(dim=1, keepdim=True).clamp(min=1) / N
        relative_load = load / fair
        dead = (relative_load < DEAD_EXPERT_FRACTION).sum()
        imbalance = load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9)
        coeff = l1_coeff if l1_coeff is not None else torch.zeros((), device=load.device)
        packed = torch.cat([
            stats.layer_sparsity, imbalance, relative_load.flatten(),
            torch.stack([
                stats.sparsity, stats.loss_term, stats.lm_loss, dead.float(), coeff.float(),
                self.stage2_step.float(), self.stage3_step.float(),
            ]),
        ]).tolist()  # the one host transfer
        layer_sparsity, layer_imbalance = packed[:L], packed[L : 2 * L]
        rel = packed[2 * L : 2 * L + L * N]
        sparsity, loss_term, lm_loss, n_dead, lam, stage2, stage3 = packed[2 * L + L * N :]
        self.window_load.zero_()

        scalars = {
            "moe/sparsity": sparsity,
            "moe/active_experts_per_token": (1 - sparsity) * N,
            "moe/dead_experts": n_dead,
            "moe/imbalance": max(layer_imbalance),
            # The least-used expert's share of its fair share (paper Fig. 8 marks < 1/64 as unused).
            "moe/min_relative_load": min(rel),
        }
        for layer in range(L):
            scalars[f"moe_layers/sparsity/layer_{layer}"] = layer_sparsity[layer]
            scalars[f"moe_layers/active_experts/layer_{layer}"] = (1 - layer_sparsity[layer]) * N
            scalars[f"moe_layers/imbalance/layer_{layer}"] = layer_imbalance[layer]
            scalars[f"moe_layers/dead_experts/layer_{layer}"] = sum(
                1 for e in range(N) if rel[layer * N + e] < DEAD_EXPERT_FRACTION
            )
        if self.target_sparsity is None:
            scalars["moe/aux_loss"] = loss_term
        else:
            scalars.update({
                "remoe/sparsity": sparsity,
                "remoe/active_experts_per_token": (1 - sparsity) * N,
                "remoe/l1_coeff": lam,
                "remoe/l1_loss": loss_term,
                "remoe/penalty": lam * loss_term,
                "remoe/stage": 3.0 if stage3 >= 0 else 2.0 if stage2 >= 0 else 1.0,
            })
            if stage3 >= 0:
                scalars["remoe/settling_step"] = stage3
        return scalars, rel


def load_image(relative_load: list[float], num_layers: int, num_experts: int):
    """The expert-load heat map for TensorBoard, [H, W, 3] uint8: layers as rows, experts as columns, each
    cell the expert's (token, expert) pairs over the logging window relative to the fair share (1 =
    balanced, 0 = idle), with labelled axes and a colour bar (clipped at 2x the fair share)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = torch.tensor(relative_load, dtype=torch.float32).view(num_layers, num_experts).numpy()
    fig = Figure(figsize=(min(2.5 + 0.3 * num_experts, 12), min(1.6 + 0.3 * num_layers, 8)), dpi=80)
    ax = fig.add_subplot()
    image = ax.imshow(cells, cmap="viridis", vmin=0, vmax=2, aspect="auto", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_xticks(range(0, num_experts, max(1, num_experts // 16)))
    ax.set_yticks(range(num_layers))
    fig.colorbar(image, ax=ax, label="load / fair share")
    fig.tight_layout()
    canvas = FigureCanvasAgg(fig)  # off-screen, whatever matplotlib backend the process uses
    canvas.draw()
    return np.ascontiguousarray(np.asarray(canvas.buffer_rgba())[..., :3])


def tensorboard_writer(metric_logger):
    """torchtitan's SummaryWriter, if TensorBoard logging is on for this rank (else None)."""
    loggers = getattr(metric_logger, "_loggers", [metric_logger])
    for candidate in loggers:
        writer = getattr(candidate, "writer", None)
        if writer is not None and hasattr(writer, "add_image"):
            return writer
    return None
