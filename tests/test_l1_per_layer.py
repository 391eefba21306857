"""The opt-in per-layer λ (`[moe] l1_coeff_per_layer`, not in the paper) against the rule written out by hand:
each layer's λ is multiplied by α while that layer's sparsity is below 1 - k/E, else divided, and the penalty
is the mean over layers of λ_l · L1_l."""

from types import SimpleNamespace

import pytest
import torch

from remoe_recipe import train as train_module
from remoe_recipe.analysis.runs import read_run
from remoe_recipe.config import MoEConfig
from remoe_recipe.model.moe import RouterRecord
from remoe_recipe.router_loss import RouterLossWrapper
from remoe_recipe.routers.relu import AdaptiveL1Objective
from remoe_recipe.routing_stats import StepRoutingStats
from tests.runs import CONFIGS

L, N, T = 3, 2, 10
ALPHA, INIT, TARGET = 1.5, 1e-3, 0.5


def _objective(per_layer: bool = True) -> AdaptiveL1Objective:
    moe = MoEConfig(l1_coeff_per_layer=per_layer, l1_coeff_init=INIT, l1_coeff_multiplier=ALPHA)
    return AdaptiveL1Objective(SimpleNamespace(moe=moe, target_sparsity=TARGET, n_layers=L), torch.device("cpu"))


def _stats(active_pairs: list[int], terms: list[float]):
    """One step: layer l routes active_pairs[l] of its T * N pairs."""
    stats = StepRoutingStats(L, N, torch.device("cpu"))
    stats.add(
        [RouterRecord(torch.tensor(terms[l]), torch.tensor([active_pairs[l] / 2] * 2), T) for l in range(L)],
        torch.tensor(50.0), torch.tensor(T),
    )
    return stats.reduce(None)


def test_each_layer_follows_its_own_sparsity():
    objective = _objective()
    steps = [[4, 15, 10], [12, 2, 9], [3, 3, 14]]  # sparsities 0.8/0.25/0.5, 0.4/0.9/0.55, ...
    expected = [INIT] * L
    for i, active in enumerate(steps, start=1):
        objective.after_step(i, _stats(active, [1.0] * L))
        for l in range(L):
            sparsity = 1 - active[l] / (T * N)
            expected[l] = expected[l] * ALPHA if sparsity < TARGET else expected[l] / ALPHA
        assert objective.controller.coeff.tolist() == pytest.approx(expected, rel=1e-6)
    # the global controller, for contrast, moves all layers together from the mean sparsity
    paper = _objective(per_layer=False)
    paper.after_step(1, _stats(steps[0], [1.0] * L))
    assert paper.controller.coeff.dim() == 0


def test_penalty_gradient_is_the_mean_of_each_layers_lambda_times_its_term():
    objective = _objective()
    objective.controller.coeff = torch.tensor([1.0, 0.1, 0.01])
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)

    class Part:
        def pop_router_records(self):
            terms = [w.pow(2).sum(), w.sum(), (3 * w).sum()]
            return [RouterRecord(t, torch.ones(N), T) for t in terms]

    wrapper = RouterLossWrapper(lambda pred, labels: (pred - labels.float()).pow(2).sum(), [Part()], objective,
                                StepRoutingStats(L, N, torch.device("cpu")))
    loss = wrapper(torch.zeros(T), torch.ones(T, dtype=torch.long))
    assert loss.item() == T  # the returned value is the LM loss alone
    loss.backward()
    expected = T * (1.0 * 2 * w.detach() + 0.1 * torch.ones(3) + 0.01 * 3 * torch.ones(3)) / L
    torch.testing.assert_close(w.grad, expected)


def test_per_layer_lambdas_survive_a_checkpoint_round_trip():
    objective = _objective()
    objective.controller.coeff = torch.tensor([1e-2, 2e-3, 3e-4])
    state = objective.state_dict()
    assert {k for k in state if k.startswith("l1_coeff")} == {"l1_coeff_layer_0", "l1_coeff_layer_1", "l1_coeff_layer_2"}
    fresh = _objective()
    fresh.load_state_dict(state)
    assert fresh.controller.coeff.tolist() == pytest.approx([1e-2, 2e-3, 3e-4])
    assert set(_objective(per_layer=False).state_dict()) == {"l1_coeff", "stage2_step", "stage3_step"}


def test_the_trainer_logs_each_layers_lambda_following_its_sparsity(tmp_path, monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    train_module.main([
        "--job.config_file", str(CONFIGS / "debug_remoe.toml"), "--job.dump_folder", str(tmp_path),
        "--moe.l1_coeff_per_layer", "--moe.l1_coeff_init", "1e-3", "--training.steps", "5",
        "--training.seq_len", "32", "--training.local_batch_size", "2", "--metrics.log_freq", "1",
        "--validation.no-enable", "--checkpoint.no-enable",
    ])
    run = read_run(tmp_path)
    target = 1 - 1 / 8
    for layer in range(4):
        lam = run[f"moe_layers/l1_coeff/layer_{layer}"]
        sparsity = run[f"moe_layers/sparsity/layer_{layer}"]
        assert lam[1] == pytest.approx(1e-3, rel=1e-6)
        for step in range(1, 5):  # the λ of step s + 1 follows the sparsity of step s
            factor = 1.2 if sparsity[step] < target else 1 / 1.2
            assert lam[step + 1] == pytest.approx(lam[step] * factor, rel=1e-5), (layer, step)
    for step in range(1, 6):
        mean = sum(run[f"moe_layers/l1_coeff/layer_{layer}"][step] for layer in range(4)) / 4
        assert run["remoe/l1_coeff"][step] == pytest.approx(mean, rel=1e-5)
