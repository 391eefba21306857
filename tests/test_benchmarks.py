"""The benchmark harness measures what it claims (its numbers themselves live in docs/benchmarks.md)."""

import pytest
import torch

from benchmarks.common import interleaved_times, peak_memory_bytes, ratio
from benchmarks.moe_layer import calibrated_layer


@pytest.mark.parametrize("experts, granularity", [(8, 1), (32, 1), (8, 8)])
def test_calibrated_layer_runs_at_target_sparsity(experts, granularity):
    moe, x = calibrated_layer(experts, granularity, "grouped_mm", 512, torch.device("cpu"))
    with torch.no_grad():
        gates = torch.relu(x.reshape(-1, x.shape[-1]) @ moe.router.gate.weight.t())
    active_per_token = (gates > 0).sum().item() / 512
    assert active_per_token == pytest.approx(granularity, rel=0.02)  # k*G with k = 1


def test_ratio_is_paired_by_round():
    r = ratio([2.0, 3.0, 8.0], [1.0, 2.0, 4.0])
    assert r == {"median": 2.0, "min": 1.5, "max": 2.0}


def test_interleaved_times_calls_every_variant_in_rotation():
    calls = []
    times = interleaved_times({n: (lambda n=n: calls.append(n)) for n in "abc"}, torch.device("cpu"), warmup=1, rounds=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert all(len(v) == 3 for v in times.values())


def test_cpu_memory_counts_saved_activations():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(128, 64)
    kind, nbytes = peak_memory_bytes(lambda: (torch.tanh(x @ w)).sum().backward(), torch.device("cpu"))
    # autograd saves x (for w's gradient) and tanh's output: 2 x 128 x 64 fp32.
    assert kind == "saved activations" and nbytes == 2 * 128 * 64 * 4


def test_router_pull_against_the_closed_form_penalty_gradient():
    """On the last layer's router weight the penalty's gradient is λ/L · xᵀ(f ⊙ 1[xW > 0]) / T (Eq. 10, f a
    constant; earlier layers also reach later layers' terms through the residual stream), and the LM's is
    the combined loss's gradient (one backward, as the trainer does) minus that."""
    from benchmarks.router_pull import pull_at
    from remoe_recipe.analysis.routing import load_model
    from remoe_recipe.preflight import load_config
    from remoe_recipe.routers import get_router

    torch.manual_seed(0)
    config = load_config(["--job.config_file", "train_configs/debug_remoe.toml"])
    model = load_model(config, None, torch.device("cpu"))  # freshly initialised, as router_pull builds it
    args = model.args
    objective = get_router("relu").objective(args, torch.device("cpu"))
    batch = torch.randint(0, args.vocab_size, (4, 33))
    coeff = 0.3
    r = pull_at(model, objective, coeff, [batch])

    routers = [moe.router for moe in model.moe_layers()]
    inputs = []
    hooks = [rt.register_forward_hook(lambda m, i, out: inputs.append(i[0].detach())) for rt in routers]
    logits = model(batch[:, :-1])
    records = model.pop_router_records()
    for h in hooks:
        h.remove()
    lm = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    total = lm + coeff * torch.stack([rec.loss_term for rec in records]).mean()
    g_total = torch.autograd.grad(total, [rt.gate.weight for rt in routers])
    num_layers, num_experts = len(routers), args.moe.num_experts
    for layer, (rt, x, g) in enumerate(zip(routers, inputs, g_total)):
        on = (x @ rt.gate.weight.detach().t() > 0).float()  # [T, E]
        tokens = x.shape[0]
        f = on.sum(dim=0) * num_experts / (args.moe.top_k * tokens)
        g_pen = coeff / num_layers * ((on * f).t() @ x) / tokens
        assert r["no_expert"][layer] == pytest.approx((on.sum(dim=1) == 0).float().mean().item())
        assert r["active"][layer] == pytest.approx(on.sum(dim=1).mean().item())
        if layer < num_layers - 1:
            continue
        g_lm = g - g_pen
        assert r["ratio"][layer] == pytest.approx((g_pen.norm() / g_lm.norm()).item(), rel=1e-3)
        cos = torch.dot(g_pen.flatten(), g_lm.flatten()) / (g_pen.norm() * g_lm.norm())
        assert r["cosine"][layer] == pytest.approx(cos.item(), abs=1e-3)


def test_dynamics_sweep_pins_its_settings_and_passes_the_config_check():
    """Every run of the training-dynamics sweep is a valid config (no key its router refuses), and the names
    mean what they say whatever the shipped debug configs are: a run's overrides replace the sweep's base."""
    from pathlib import Path

    from benchmarks.dynamics import SWEEP, _command
    from remoe_recipe.preflight import load_config

    for name in SWEEP:
        argv = _command(name, Path("/nonexistent"))[3:]  # after `python -m remoe_recipe.train`
        config = load_config(argv)
        lr, batch = config.optimizer.lr, config.training.local_batch_size
        assert lr == (2e-3 if "lr2e-3" in name else 1e-3 if "lr1e-3" in name else 5e-4), name
        assert batch == (32 if "_b32" in name else 128 if "_b128" in name else 16 if "_b16" in name else 8), name
        assert config.moe.router_init_std == (0.1 if "ri0.1" in name else 0.025 if "ri0.025" in name else 0.01), name
        if name.startswith("r_"):
            assert config.moe.l1_coeff_multiplier == (1.1 if "a1.1" in name else 1.2), name
            assert config.moe.load_balance == ("noLB" not in name), name
