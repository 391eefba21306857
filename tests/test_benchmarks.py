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
