"""Routing statistics and TensorBoard metrics against counts computed independently on a fixed routing."""

from types import SimpleNamespace

import pytest
import torch

from remoe_recipe.config import MoEConfig
from remoe_recipe.metrics import DEAD_EXPERT_FRACTION, RoutingMonitor, load_image
from remoe_recipe.model.moe import RouterRecord
from remoe_recipe.routers.relu import AdaptiveL1Objective
from remoe_recipe.routers.topk import AuxLossObjective
from remoe_recipe.routing_stats import StepRoutingStats

L, N, T = 3, 4, 6


def _fixed_masks(seed: int) -> list[list[list[int]]]:
    """masks[layer][token][expert] in {0, 1}, as plain Python lists."""
    g = torch.Generator().manual_seed(seed)
    masks = (torch.rand(L, T, N, generator=g) < 0.4).int().tolist()
    masks[2] = [[1, 0, 0, 0] for _ in range(T)]  # layer 2: every token on expert 0 only
    return masks


def _records(masks, loss_terms):
    return [
        RouterRecord(
            loss_term=torch.tensor(loss_terms[layer]),
            tokens_per_expert=torch.tensor(masks[layer], dtype=torch.float32).sum(0),
            num_tokens=T,
        )
        for layer in range(L)
    ]


def test_step_stats_and_monitor_match_hand_counts():
    micro = [_fixed_masks(0), _fixed_masks(1)]  # two micro-batches of one step
    terms = [[0.5, 1.0, 2.0], [1.5, 3.0, 4.0]]
    stats = StepRoutingStats(L, N, torch.device("cpu"))
    for masks, term in zip(micro, terms):
        stats.add(_records(masks, term), lm_loss_sum=torch.tensor(12.0), lm_tokens=torch.tensor(T))
    reduced = stats.reduce(group=None)

    # Counts by plain loops.
    active = [sum(m[l][t][e] for m in micro for t in range(T) for e in range(N)) for l in range(L)]
    expected_sparsity = 1 - sum(active) / (L * 2 * T * N)
    assert reduced.sparsity.item() == pytest.approx(expected_sparsity)
    for l in range(L):
        assert reduced.layer_sparsity[l].item() == pytest.approx(1 - active[l] / (2 * T * N))
    expected_term = sum((terms[0][l] + terms[1][l]) / 2 for l in range(L)) / L
    assert reduced.loss_term.item() == pytest.approx(expected_term)
    assert reduced.lm_loss.item() == pytest.approx(24.0 / (2 * T))

    objective = relu_objective(target=0.75, lam=0.01)
    monitor = RoutingMonitor(L, N, objective, device=torch.device("cpu"))
    monitor.observe(reduced)
    objective.after_step(1, reduced)
    scalars, relative_load = monitor.collect(reduced)

    load = [[sum(m[l][t][e] for m in micro for t in range(T)) for e in range(N)] for l in range(L)]
    dead = 0
    for l in range(L):
        mean = sum(load[l]) / N
        assert scalars[f"moe_layers/imbalance/layer_{l}"] == pytest.approx(max(load[l]) / mean)
        assert scalars[f"moe_layers/active_experts/layer_{l}"] == pytest.approx(active[l] / (2 * T))
        dead += sum(1 for x in load[l] if x < DEAD_EXPERT_FRACTION * mean)
    assert scalars["moe/dead_experts"] == dead >= 3  # layer 2's experts 1..3 never get a token
    assert scalars["moe_layers/imbalance/layer_2"] == pytest.approx(N)
    assert scalars["moe/sparsity"] == pytest.approx(expected_sparsity)
    assert "remoe/sparsity" not in scalars  # one name per quantity
    assert scalars["remoe/l1_coeff"] == pytest.approx(0.01)  # the λ the step used, not the updated one
    assert objective.controller.coeff.item() == pytest.approx(0.01 * 1.2)  # sparsity below 0.75: ×α
    assert scalars["remoe/penalty"] == pytest.approx(0.01 * expected_term)
    # Relative load (1 = the fair share): layer 2 sends every pair to expert 0 (N times its share).
    for l in range(L):
        mean = sum(load[l]) / N
        assert relative_load[l * N : (l + 1) * N] == pytest.approx([x / mean for x in load[l]])
    assert relative_load[2 * N : 3 * N] == pytest.approx([N, 0, 0, 0])
    image = load_image(relative_load, L, N)  # the TensorBoard heat map: RGB with axes and a colour bar
    assert str(image.dtype) == "uint8"
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[0] > 100 and image.shape[1] > 100


def relu_objective(target: float, lam: float) -> AdaptiveL1Objective:
    args = SimpleNamespace(moe=MoEConfig(l1_coeff_init=lam), target_sparsity=target)
    return AdaptiveL1Objective(args, torch.device("cpu"))


def test_stages_follow_penalty_and_target():
    """Stage I until lambda * L1 >= 1e-3 * LM loss, II until sparsity >= target, then III."""
    objective = relu_objective(target=0.5, lam=1e-8)
    monitor = RoutingMonitor(1, 2, objective, device=torch.device("cpu"))
    stats = StepRoutingStats(1, 2, torch.device("cpu"))

    def step(i, active_pairs, lam, term, lm_loss=5.0):
        stats.reset()
        stats.add(
            [RouterRecord(torch.tensor(term), torch.tensor([active_pairs / 2, active_pairs / 2]), 10)],
            torch.tensor(lm_loss * 10), torch.tensor(10),
        )
        r = stats.reduce(None)
        objective.controller.coeff = torch.tensor(lam)
        monitor.observe(r)
        objective.after_step(i, r)
        return monitor.collect(r)[0]

    assert step(1, 18, 1e-8, 2.0)["remoe/stage"] == 1  # sparsity 0.1, negligible penalty
    assert step(2, 18, 1e-3, 2.0)["remoe/stage"] == 1  # penalty 2e-3 < 5e-3
    s = step(3, 16, 3e-3, 2.0)  # penalty 6e-3 >= 1e-3 * 5
    assert s["remoe/stage"] == 2 and "remoe/settling_step" not in s
    s = step(4, 10, 1e-2, 1.0)  # sparsity 0.5 reaches the target
    assert s["remoe/stage"] == 3 and s["remoe/settling_step"] == 4
    s = step(5, 14, 1e-2, 1.0)  # stage III is kept when sparsity dips again
    assert s["remoe/stage"] == 3 and s["remoe/settling_step"] == 4


def test_topk_monitor_logs_aux_loss_and_no_remoe_scalars():
    stats = StepRoutingStats(1, 4, torch.device("cpu"))
    stats.add([RouterRecord(torch.tensor(1.25), torch.tensor([2.0, 1.0, 1.0, 0.0]), 4)], torch.tensor(8.0), torch.tensor(4))
    r = stats.reduce(None)
    objective = AuxLossObjective(SimpleNamespace(moe=MoEConfig(router="topk")), torch.device("cpu"))
    monitor = RoutingMonitor(1, 4, objective, device=torch.device("cpu"))
    monitor.observe(r)
    objective.after_step(1, r)
    scalars, _ = monitor.collect(r)
    assert scalars["moe/aux_loss"] == pytest.approx(1.25)
    assert scalars["moe/active_experts_per_token"] == pytest.approx(1.0)
    assert scalars["moe/dead_experts"] == 1
    assert not any(k.startswith("remoe/") for k in scalars)


@pytest.mark.parametrize("router", ["relu", "topk", "hash", "expert_choice"])
def test_every_logged_tag_is_documented_once(router):
    """The tags a router's run writes (shared MoE metrics, routing alerts, the router's own) each appear in
    docs/observability.md, and no two tags carry the same value by construction (one name per quantity)."""
    import re
    from pathlib import Path

    from remoe_recipe.routers import get_router
    from remoe_recipe.routing_health import RoutingHealth

    L_, N_ = 2, 4
    args = SimpleNamespace(moe=MoEConfig(router=router), target_sparsity=0.75)
    objective = get_router(router).objective(args, torch.device("cpu"))
    stats = StepRoutingStats(L_, N_, torch.device("cpu"))
    stats.add([RouterRecord(torch.tensor(0.5 + l), torch.tensor([3.0, 1.0, 0.0, 2.0]), 6) for l in range(L_)],
              torch.tensor(12.0), torch.tensor(6))
    reduced = stats.reduce(None)
    monitor = RoutingMonitor(L_, N_, objective, torch.device("cpu"))
    monitor.observe(reduced)
    objective.after_step(1, reduced)
    scalars = monitor.collect(reduced)[0]
    health = RoutingHealth(L_, N_, 100, 0.5, torch.device("cpu"))
    health.check(1, health.update(reduced).tolist())
    scalars.update(health.scalars())
    docs = (Path(__file__).resolve().parents[1] / "docs" / "observability.md").read_text()
    documented = set(re.findall(r"`([a-z_0-9]+/[a-z_0-9/()%]+)`", docs))
    for tag in scalars:
        generic = re.sub(r"layer_\d+$", "layer_i", tag)
        assert generic in documented, f"{tag} is not in docs/observability.md"
    assert "remoe/sparsity" not in scalars and "remoe/active_experts_per_token" not in scalars
