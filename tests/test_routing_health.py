"""Routing alerts: a layer that stops routing is named in the log and in TensorBoard.
(The same through a real run: tests/test_run_log.py.)"""

import pytest
import torch

from remoe_recipe.routing_health import RoutingHealth
from remoe_recipe.routing_stats import ReducedRoutingStats

L, N = 3, 4


def _stats(loads):
    load = torch.tensor(loads, dtype=torch.float32)
    zero = torch.zeros(())
    return ReducedRoutingStats(zero, torch.zeros(L), zero, torch.zeros(L), load, zero, N)


def test_alerts_after_the_set_number_of_steps_once_per_episode():
    health = RoutingHealth(L, N, alert_steps=3, dead_share=0.5, device="cpu")
    healthy = [10, 10, 10, 10]
    # Layer 1 fully sparse; layer 2: 3 of 4 experts at 1 / (100 / 4) = 4 % of the fair share (< 10 %).
    sick = [healthy, [0, 0, 0, 0], [97, 1, 1, 1]]
    warnings = []
    for step in range(1, 6):
        warnings.append(health.check(step, health.update(_stats(sick)).tolist()))
    assert warnings[:2] == [[], []]
    assert len(warnings[2]) == 2
    assert "step 3: MoE layer 1 has been 100 % sparse for 3 steps" in warnings[2][0]
    assert "step 3: MoE layer 2 has had more than 50% of its experts dead for 3 steps (3 of 4" in warnings[2][1]
    assert warnings[3:] == [[], []]  # once per episode
    assert health.scalars() == {
        "moe_layers/unhealthy/layer_0": 0.0, "moe_layers/unhealthy/layer_1": 1.0,
        "moe_layers/unhealthy/layer_2": 1.0, "moe/unhealthy_layers": 2.0,
    }
    # Layer 1 recovers for a step: the episode ends, and a new one warns again after 3 more steps.
    health.check(6, health.update(_stats([healthy, healthy, [97, 1, 1, 1]])).tolist())
    assert health.scalars()["moe_layers/unhealthy/layer_1"] == 0.0
    later = [health.check(s, health.update(_stats(sick)).tolist()) for s in (7, 8, 9)]
    assert later[:2] == [[], []] and len(later[2]) == 1 and "step 9: MoE layer 1" in later[2][0]
