"""The router registry and the two baselines it adds (hash, expert choice), each against a naive
reference written here with plain Python loops: per token for hash routing, per expert for expert
choice, and a per-token SwiGLU loop for the whole MoE layer."""

import math

import pytest
import torch
import torch.nn.functional as F

from remoe_recipe.config import MoEConfig, moe_problems
from remoe_recipe.model.args import ReMoEModelArgs
from remoe_recipe.model.moe import MoE
from remoe_recipe.routers import Routing, build_router, get_router, router_names
from remoe_recipe.routers.expert_choice import ExpertChoiceRouter
from remoe_recipe.routers.hash_routing import HashRouter


def model_args(router: str, dim: int = 16, ffn_dim: int = 32, **moe) -> ReMoEModelArgs:
    return ReMoEModelArgs(dim=dim, ffn_dim=ffn_dim, moe=MoEConfig(router=router, **moe))


# ------------------------------------------------------------------------------------------------
# naive references
# ------------------------------------------------------------------------------------------------


def naive_hash_mask(token_ids: list[int], num_experts: int, top_k: int) -> list[list[bool]]:
    """Token t uses experts (t*k + j) mod N, j < k."""
    mask = [[False] * num_experts for _ in token_ids]
    for row, t in enumerate(token_ids):
        for j in range(top_k):
            mask[row][(t * top_k + j) % num_experts] = True
    return mask


def naive_softmax_scores(x: torch.Tensor, weight: torch.Tensor) -> list[list[float]]:
    """scores[t][e] = softmax over experts of token t's logits, one token at a time, in float64."""
    xs, w = x.double().tolist(), weight.double().tolist()
    scores = []
    for xt in xs:
        logits = [sum(a * b for a, b in zip(we, xt)) for we in w]
        top = max(logits)
        exps = [math.exp(v - top) for v in logits]
        total = sum(exps)
        scores.append([v / total for v in exps])
    return scores


def naive_expert_choice(scores: list[list[float]], top_k: int) -> list[tuple[int, int]]:
    """(token, expert) pairs: each expert, on its own, takes its C highest-scoring tokens."""
    num_tokens, num_experts = len(scores), len(scores[0])
    capacity = min(num_tokens, math.ceil(num_tokens * top_k / num_experts))
    pairs = []
    for e in range(num_experts):
        ranked = sorted(range(num_tokens), key=lambda t: scores[t][e], reverse=True)
        pairs += [(t, e) for t in ranked[:capacity]]
    return pairs


def naive_moe(x: torch.Tensor, layer: MoE, chosen: dict[int, list[tuple[int, float]]]) -> torch.Tensor:
    """out[t] = sum over token t's (expert, gate) of gate * SwiGLU_e(x[t]), one token at a time."""
    w1, w2, w3 = (getattr(layer.experts, n).detach().double() for n in ("w1", "w2", "w3"))
    xs = x.detach().double()
    out = torch.zeros_like(xs)
    for t in range(xs.shape[0]):
        for e, gate in chosen.get(t, []):
            h = F.silu(w1[e] @ xs[t]) * (w3[e] @ xs[t])
            out[t] += gate * (w2[e] @ h)
    return out


def fresh_layer(router, dim: int, expert_dim: int) -> MoE:
    layer = MoE(dim, expert_dim, router, use_grouped_mm=True)
    with torch.no_grad():
        # Large enough that a wrong expert or gate moves the output far beyond the 1e-5 tolerance.
        layer.init_weights(0.3, 0.3)
    return layer


# ------------------------------------------------------------------------------------------------
# hash routing
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_experts, top_k", [(8, 1), (8, 2), (16, 3), (5, 2)])
def test_hash_router_matches_the_per_token_hash(num_experts, top_k):
    gen = torch.Generator().manual_seed(num_experts * 10 + top_k)
    ids = torch.randint(0, 50_000, (64,), generator=gen)
    router = HashRouter(num_experts, top_k)
    routing = router(torch.randn(64, 4), ids)

    expected = torch.tensor(naive_hash_mask(ids.tolist(), num_experts, top_k))
    assert torch.equal(routing.mask, expected)
    # Gate 1 on every chosen pair, 0 elsewhere (Hash Layers weight nothing).
    assert torch.equal(routing.gates, expected.float())
    assert routing.loss_term.item() == 0.0
    # The layer sizes its buffers from num_pairs without reading the mask: it must be the real count.
    assert router.num_pairs(64) == int(expected.sum()) == 64 * top_k


def test_hash_router_without_token_ids_is_a_clear_error():
    with pytest.raises(ValueError, match="token ids"):
        HashRouter(8, 1)(torch.randn(4, 16))


@pytest.mark.parametrize("top_k", [1, 2])
def test_hash_router_at_granularity_routes_whole_coarse_experts(top_k):
    # E = 8 coarse experts, G = 4 slices each: fine expert c*G + g is slice g of coarse expert c.
    E, G = 8, 4
    router = build_router("hash", model_args("hash", num_experts=E, granularity=G, top_k=top_k))
    ids = torch.randint(0, 50_000, (40,), generator=torch.Generator().manual_seed(top_k))
    mask = router(torch.randn(40, 16), ids).mask
    assert mask.shape == (40, E * G)
    for row, t in enumerate(ids.tolist()):
        coarse = {(t * top_k + j) % E for j in range(top_k)}  # coarse hashing with k per token
        expected = {c * G + g for c in coarse for g in range(G)}
        assert set(mask[row].nonzero().flatten().tolist()) == expected, t


def test_moe_layer_with_hash_routing_matches_a_per_token_loop():
    torch.manual_seed(0)
    N, k, D, H = 6, 2, 12, 20
    layer = fresh_layer(HashRouter(N, k), D, H)
    x = torch.randn(2, 7, D)
    ids = torch.randint(0, 1000, (2, 7))
    out = layer(x, ids)

    flat_ids = ids.flatten().tolist()
    mask = naive_hash_mask(flat_ids, N, k)
    chosen = {t: [(e, 1.0) for e in range(N) if mask[t][e]] for t in range(len(flat_ids))}
    ref = naive_moe(x.reshape(-1, D), layer, chosen).reshape(x.shape)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# expert choice
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens, num_experts, top_k",
    [(24, 8, 1), (10, 4, 3), (5, 8, 2), (13, 6, 1), (1, 4, 1)],  # C = 3, 8, 2, 3, 1
)
def test_expert_choice_router_matches_per_expert_selection(num_tokens, num_experts, top_k):
    gen = torch.Generator().manual_seed(num_tokens * 100 + num_experts * 10 + top_k)
    D = 16
    router = ExpertChoiceRouter(D, num_experts, top_k)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(num_experts, D, generator=gen))
    x = torch.randn(num_tokens, D, generator=gen)
    routing = router(x)

    scores = naive_softmax_scores(x, router.gate.weight)
    pairs = naive_expert_choice(scores, top_k)
    capacity = math.ceil(num_tokens * top_k / num_experts)
    expected_mask = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    expected_gates = torch.zeros(num_tokens, num_experts, dtype=torch.float64)
    for t, e in pairs:
        expected_mask[t, e] = True
        expected_gates[t, e] = scores[t][e]  # a chosen pair's gate is its softmax score
    assert torch.equal(routing.mask, expected_mask)
    torch.testing.assert_close(routing.gates.double(), expected_gates, atol=1e-6, rtol=1e-5)
    # Balanced by construction: every expert takes exactly C tokens.
    assert routing.mask.sum(dim=0).tolist() == [capacity] * num_experts
    assert router.num_pairs(num_tokens) == num_experts * capacity == int(routing.mask.sum())
    assert routing.loss_term.item() == 0.0


def test_expert_choice_gradient_reaches_the_gate_weight():
    gen = torch.Generator().manual_seed(7)
    T, N, k, D = 12, 4, 1, 8
    router = ExpertChoiceRouter(D, N, k)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(N, D, generator=gen))
    x = torch.randn(T, D, generator=gen)
    upstream = torch.randn(T, N, generator=gen)
    (router(x).gates * upstream).sum().backward()

    # Reference gradient: the same objective over the naively chosen pairs, softmax per token in float64.
    pairs = naive_expert_choice(naive_softmax_scores(x, router.gate.weight), k)
    w = router.gate.weight.detach().double().requires_grad_()
    total = sum(upstream[t, e].double() * torch.softmax(w @ x[t].double(), dim=0)[e] for t, e in pairs)
    total.backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0
    torch.testing.assert_close(router.gate.weight.grad.double(), w.grad, atol=1e-6, rtol=1e-5)


def test_moe_layer_with_expert_choice_matches_a_per_token_loop():
    torch.manual_seed(1)
    N, k, D, H = 4, 1, 12, 20
    layer = fresh_layer(ExpertChoiceRouter(D, N, k), D, H)
    with torch.no_grad():
        layer.router.gate.weight.normal_(0, 1.0)  # well-separated scores: no near-ties in the choice
    x = torch.randn(2, 9, D)
    out = layer(x)

    flat = x.reshape(-1, D)
    scores = naive_softmax_scores(flat, layer.router.gate.weight)
    chosen: dict[int, list[tuple[int, float]]] = {}
    for t, e in naive_expert_choice(scores, k):
        chosen.setdefault(t, []).append((e, scores[t][e]))
    ref = naive_moe(flat, layer, chosen).reshape(x.shape)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# the registry
# ------------------------------------------------------------------------------------------------


def test_unknown_router_error_lists_the_registered_names():
    with pytest.raises(ValueError) as info:
        get_router("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in ("relu", "topk", "dense", "hash", "expert_choice"):  # the built-in routers
        assert repr(name) in message


def test_config_check_refuses_a_key_the_router_does_not_read():
    assert moe_problems(MoEConfig(router="hash")) == []  # control: the defaults pass
    problems = moe_problems(MoEConfig(router="hash", aux_loss_coeff=0.5))
    assert any("moe.aux_loss_coeff" in p and "'hash'" in p for p in problems), problems


@pytest.mark.parametrize("name", [n for n in router_names() if get_router(n).has_experts])
def test_every_router_returns_a_routing_whose_pairs_match_num_pairs(name):
    torch.manual_seed(0)
    args = model_args(name, num_experts=4, top_k=1, granularity=2)  # N = 8, k*G = 2
    router = build_router(name, args)
    with torch.no_grad():
        router.init_weights(0.5)
    T = 20
    routing = router(torch.randn(T, args.dim), torch.randint(0, 1000, (T,)))
    assert isinstance(routing, Routing)
    assert routing.mask.shape == routing.gates.shape == (T, 8) and routing.mask.dtype == torch.bool
    assert not routing.gates[~routing.mask].any()  # no gate outside the pairs that run
    assert routing.loss_term.dim() == 0
    pairs = router.num_pairs(T)
    if pairs is not None:  # the MoE layer trusts it instead of reading the mask
        assert int(routing.mask.sum()) == pairs


def test_dense_has_no_routing_module():
    with pytest.raises(ValueError, match="no experts"):
        build_router("dense", model_args("dense"))
