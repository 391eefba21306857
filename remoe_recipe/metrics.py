"""Routing metrics for TensorBoard: what the router does, per layer, at every logged step.

Fed every step with the step's reduced statistics (already summed over micro-batches and data-parallel
ranks), it keeps everything on the device; at a logged step it reads all values back in ONE transfer,
together with the router objective's own metrics (remoe/* for ReMoE, moe/aux_loss for TopK: the
router's file defines them). Every tag has one name and one meaning (docs/observability.md lists them).

Definitions:
- sparsity: fraction of zero gates (paper Eq. 8); active experts per token = (1 - sparsity) * N.
- expert load: (token, expert) pairs routed to each expert over the logging window; shown relative to
  the fair share (the layer's pairs / N), so 1 is perfectly balanced. Imbalance = max / mean load.
- dead expert: load below DEAD_EXPERT_FRACTION of the fair share over the logging window.
"""

import json
import os

import torch

from remoe_recipe import named_tensors
from remoe_recipe.routers import RouterObjective
from remoe_recipe.routing_stats import ReducedRoutingStats

DEAD_EXPERT_FRACTION = 0.1


class RoutingMonitor:
    def __init__(self, num_layers: int, num_experts: int, objective: RouterObjective, device):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.objective = objective
        self.window_load = torch.zeros(num_layers, num_experts, device=device)

    def observe(self, stats: ReducedRoutingStats) -> None:
        """Every step, device-only (no host synchronisation)."""
        self.window_load += stats.tokens_per_expert

    def collect(self, stats: ReducedRoutingStats):
        """At a logged step: (scalars, relative expert load: L * N floats, layer-major, 1 = the fair share).
        Resets the logging window. `load_image` draws the relative load for TensorBoard."""
        L, N = self.num_layers, self.num_experts
        load = self.window_load
        fair = load.sum(dim=1, keepdim=True).clamp(min=1) / N
        relative_load = load / fair
        own = self.objective.log_tensors(stats)
        host = named_tensors.to_host({
            "layer_sparsity": stats.layer_sparsity,
            "layer_imbalance": load.max(dim=1).values / load.mean(dim=1).clamp(min=1e-9),
            "relative_load": relative_load,
            "sparsity": stats.sparsity,
            "dead": (relative_load < DEAD_EXPERT_FRACTION).sum(),
            **{f"objective:{tag}": value for tag, value in own.items()},
        })  # the one host transfer
        self.window_load.zero_()
        sparsity, rel, layer_sparsity = host["sparsity"], host["relative_load"], host["layer_sparsity"]
        scalars = {
            "moe/sparsity": sparsity,
            "moe/active_experts_per_token": (1 - sparsity) * N,
            "moe/dead_experts": host["dead"],
            "moe/imbalance": max(host["layer_imbalance"]),
            # The least-used expert's share of its fair share (paper Fig. 8 marks < 1/64 as unused).
            "moe/min_relative_load": min(rel),
        }
        for layer in range(L):
            scalars[f"moe_layers/sparsity/layer_{layer}"] = layer_sparsity[layer]
            scalars[f"moe_layers/active_experts/layer_{layer}"] = (1 - layer_sparsity[layer]) * N
            scalars[f"moe_layers/imbalance/layer_{layer}"] = host["layer_imbalance"][layer]
            scalars[f"moe_layers/dead_experts/layer_{layer}"] = sum(
                1 for e in range(N) if rel[layer * N + e] < DEAD_EXPERT_FRACTION
            )
        scalars.update(self.objective.scalars({tag: host[f"objective:{tag}"] for tag in own}))
        return scalars, rel


EXPERT_LOAD_FILE = "expert_load.jsonl"


def append_expert_load(run_dir: str, step: int, relative_load: list[float], num_layers: int, num_experts: int) -> None:
    """One line of RUN/expert_load.jsonl: every expert's load over the logging window ending at `step`, relative
    to its layer's fair share, [layer][expert]. TensorBoard keeps per-layer summaries and a picture every 10th
    logged step; this file keeps which expert was starved when (analysis.health reads it)."""
    rows = [relative_load[layer * num_experts : (layer + 1) * num_experts] for layer in range(num_layers)]
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, EXPERT_LOAD_FILE), "a") as f:
        f.write(json.dumps({"step": step, "relative_load": [[round(v, 6) for v in row] for row in rows]}) + "\n")


def read_expert_load(run_dir) -> dict[int, list[list[float]]]:
    """{step: [layer][expert] relative load}; a step logged twice (a resume from an earlier checkpoint) keeps
    the later line. Empty when the run has no such file."""
    path = os.path.join(run_dir, EXPERT_LOAD_FILE)
    loads: dict[int, list[list[float]]] = {}
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    loads[int(record["step"])] = record["relative_load"]
    return loads


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
