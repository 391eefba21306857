"""Tests of remoe_recipe.model: routers, the MoE layer, the decoder, parameter / FLOP accounting,
and the [moe] config validation.

Every expectation is computed independently of the code under test: the paper's formulas written
out with explicit Python loops, naive token-by-token references built from the layers' own weights,
and the paper's published parameter / FLOP numbers (§3, §4.1 and Table 1).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from remoe_recipe.config import ConfigError, MoEConfig, moe_problems
from remoe_recipe.model import MoE, ReMoEModelArgs, ReMoETransformer, remoe_flavors
from remoe_recipe.routers.relu import ReLURouter
from remoe_recipe.routers.topk import TopKRouter
from tests.moe_layers import make_router

# ------------------------------------------------------------------------------------------------
# independent references
# ------------------------------------------------------------------------------------------------


def silu(v):
    return v * torch.sigmoid(v)


def expert_ffn(w1, w2, w3, e, x_t):
    """SwiGLU expert e on one token: w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x))."""
    return w2[e] @ (silu(w1[e] @ x_t) * (w3[e] @ x_t))


def naive_gates(x_t, W, router, top_k):
    """Gate vector of one token, as a list of 0-d tensors (differentiable), from the paper's formulas."""
    n = W.shape[0]
    logits = [torch.dot(W[e], x_t) for e in range(n)]
    if router == "relu":  # Eq. 5: ReLU(x W), nothing else
        return [torch.clamp(v, min=0) for v in logits]
    # Eq. 2: softmax over all experts, then TopK, not renormalised
    m = max(v.item() for v in logits)
    exps = [torch.exp(v - m) for v in logits]
    z = sum(exps)
    probs = [p / z for p in exps]
    chosen = sorted(range(n), key=lambda e: -probs[e].item())[:top_k]
    return [probs[e] if e in chosen else probs[e] * 0 for e in range(n)]


def naive_moe(x, W, w1, w2, w3, router, top_k):
    """y_t = sum over e with gate > 0 of gate_te * FFN_e(x_t), token by token."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows = []
    for t in range(x2.shape[0]):
        gates = naive_gates(x2[t], W, router, top_k)
        y = torch.zeros(shape[-1], dtype=x.dtype)
        for e, g in enumerate(gates):
            if g.item() > 0:
                y = y + g * expert_ffn(w1, w2, w3, e, x2[t])
        rows.append(y)
    return torch.stack(rows).reshape(shape)


def rmsnorm(x, weight, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rope(v, theta):
    """Rotate adjacent pairs (v[2i], v[2i+1]) of each head by pos * theta^(-2i/hd). v: [S, H, hd]."""
    seq, _, hd = v.shape
    pos = torch.arange(seq, dtype=torch.float64)[:, None]
    freq = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = (pos * freq[None, :]).float()[:, None, :]  # [S, 1, hd/2]
    a, b = v[..., 0::2], v[..., 1::2]
    out = torch.empty_like(v)
    out[..., 0::2] = a * torch.cos(ang) - b * torch.sin(ang)
    out[..., 1::2] = a * torch.sin(ang) + b * torch.cos(ang)
    return out


def naive_attention(x, attn, n_heads, n_kv_heads, theta):
    """Causal GQA with RoPE, one sequence and one head at a time. x: [B, S, D]."""
    bsz, seq, _ = x.shape
    hd = attn.wq.weight.shape[0] // n_heads
    group = n_heads // n_kv_heads
    outs = []
    for b in range(bsz):
        q = rope((x[b] @ attn.wq.weight.T).reshape(seq, n_heads, hd), theta)
        k = rope((x[b] @ attn.wk.weight.T).reshape(seq, n_kv_heads, hd), theta)
        v = (x[b] @ attn.wv.weight.T).reshape(seq, n_kv_heads, hd)
        heads = []
        for h in range(n_heads):
            kv = h // group
            scores = (q[:, h] @ k[:, kv].T) / math.sqrt(hd)
            causal = torch.ones(seq, seq, dtype=torch.bool).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(scores, dim=-1) @ v[:, kv])
        outs.append(torch.cat(heads, dim=-1) @ attn.wo.weight.T)
    return torch.stack(outs)


def naive_block(block, x, args):
    h = x + naive_attention(
        rmsnorm(x, block.attention_norm.weight, args.norm_eps), block.attention,
        args.n_heads, args.n_kv_heads, args.rope_theta,
    )
    z = rmsnorm(h, block.ffn_norm.weight, args.norm_eps)
    if block.moe_enabled:
        moe = block.moe
        ffn = naive_moe(
            z, moe.router.gate.weight, moe.experts.w1, moe.experts.w2, moe.experts.w3,
            args.moe.router, args.routed_top_k,
        )
    else:
        ff = block.feed_forward
        ffn = (silu(z @ ff.w1.weight.T) * (z @ ff.w3.weight.T)) @ ff.w2.weight.T
    return h + ffn


def close(actual, expected, rtol=1e-5):
    """fp32 comparison, relative to the scale of the expected tensor."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-6))


# ------------------------------------------------------------------------------------------------
# 1. ReLU router = paper Eq. 5
# ------------------------------------------------------------------------------------------------


def test_relu_router_is_plain_relu_of_logits():
    torch.manual_seed(0)
    T, D, N = 10, 8, 6
    router = ReLURouter(D, N, top_k=1, load_balance=True)
    W = torch.randn(N, D)
    W[:, 0] = W[:, 0].abs() + 1.0  # every expert has a positive weight on feature 0
    with torch.no_grad():
        router.gate.weight.copy_(W)
    x = torch.randn(T, D)
    x[3] = 0.0
    x[3, 0] = -10.0  # token 3: every logit = -10 * W[e, 0] < 0

    r = router(x)
    expected = torch.clamp(x @ W.T, min=0)
    assert r.gates.dtype == torch.float32
    close(r.gates, expected)
    assert torch.equal(r.mask, expected > 0)
    assert torch.equal(r.mask, r.gates > 0)
    # no softmax / renormalisation: rows are not probability vectors
    row_sums = r.gates.sum(dim=1)
    assert not torch.allclose(row_sums, torch.ones(T), atol=1e-3)
    # a token with all-negative logits has an all-zero row, and so an empty mask row
    assert torch.equal(r.gates[3], torch.zeros(N))
    assert not r.mask[3].any()
    # nothing is clipped from above or shifted: positive logits pass through unchanged
    pos = (x @ W.T) > 0
    close(r.gates[pos], (x @ W.T)[pos])
    assert r.mask.sum() < T * N and r.mask.sum() > 0  # a genuinely mixed pattern


def test_relu_router_bf16_gates_are_fp32():
    torch.manual_seed(0)
    router = ReLURouter(8, 4, top_k=1, load_balance=False).to(torch.bfloat16)
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    r = router(x)
    assert r.gates.dtype == torch.float32
    expected = torch.clamp((x @ router.gate.weight.T).float(), min=0)
    torch.testing.assert_close(r.gates, expected, rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------------
# 2. L1 terms: Eq. 9 (plain) and Eq. 10 (load-balance aware), values and gradients
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("load_balance", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_relu_router_l1_term_value_and_gradient(load_balance, top_k):
    torch.manual_seed(1)
    T, D, N = 12, 8, 6
    router = ReLURouter(D, N, top_k=top_k, load_balance=load_balance)
    with torch.no_grad():
        router.gate.weight.normal_()
    W = router.gate.weight.detach().clone()
    x = torch.randn(T, D)
    r = router(x)

    logits = [[float(torch.dot(W[e], x[t])) for e in range(N)] for t in range(T)]
    R = [[max(logits[t][e], 0.0) for e in range(N)] for t in range(T)]
    if load_balance:
        # Eq. 11: f_e = E / (k T) * #{t : R_te > 0}
        f = [N / (top_k * T) * sum(1 for t in range(T) if R[t][e] > 0) for e in range(N)]
    else:
        f = [1.0] * N  # Eq. 9 is Eq. 10 with f = 1
    expected = sum(f[e] * R[t][e] for t in range(T) for e in range(N)) / T
    assert r.loss_term.dim() == 0
    assert r.loss_term.item() == pytest.approx(expected, rel=1e-5)

    # gradient with f held constant: dL/dW[e] = f_e / T * sum over tokens with logit > 0 of x_t
    r.loss_term.backward()
    grad = torch.zeros(N, D)
    for e in range(N):
        for t in range(T):
            if logits[t][e] > 0:
                grad[e] += f[e] / T * x[t]
    close(router.gate.weight.grad, grad)


def test_relu_router_lb_term_equals_megatron_switch_form():
    """Eq. 10 equals Megatron's switch_load_balancing_loss_func form E/(kT^2) sum_e P_e c_e."""
    torch.manual_seed(2)
    T, D, N, k = 16, 8, 8, 1
    router = ReLURouter(D, N, top_k=k, load_balance=True)
    with torch.no_grad():
        router.gate.weight.normal_()
    x = torch.randn(T, D)
    R = torch.clamp(x @ router.gate.weight.detach().T, min=0)
    expected = N / (k * T * T) * float((R.sum(0) * (R > 0).sum(0)).sum())
    assert router(x).loss_term.item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------
# 3. TopK baseline router = Eq. 2 (softmax over all, then TopK, not renormalised)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
def test_topk_router_gates_mask_and_aux_loss(top_k):
    torch.manual_seed(3)
    T, D, N = 10, 8, 6
    router = TopKRouter(D, N, top_k=top_k)
    with torch.no_grad():
        router.gate.weight.normal_()
    W = router.gate.weight.detach().clone()
    x = torch.randn(T, D)
    r = router(x)

    probs = [[0.0] * N for _ in range(T)]
    chosen = []
    for t in range(T):
        logits = [float(torch.dot(W[e], x[t])) for e in range(N)]
        m = max(logits)
        z = sum(math.exp(v - m) for v in logits)
        probs[t] = [math.exp(v - m) / z for v in logits]
        chosen.append(sorted(range(N), key=lambda e: -probs[t][e])[:top_k])

    exp_gates = torch.zeros(T, N)
    exp_mask = torch.zeros(T, N, dtype=torch.bool)
    for t in range(T):
        for e in chosen[t]:
            exp_gates[t, e] = probs[t][e]
            exp_mask[t, e] = True
    assert torch.equal(r.mask, exp_mask)
    assert (r.mask.sum(1) == top_k).all()
    close(r.gates, exp_gates)  # the softmax probabilities themselves, not renormalised
    if top_k == 1:
        assert (r.gates.sum(1) < 1 - 1e-3).all()

    # Switch-style general-k LB loss: N / (k T^2) * sum_e (sum_t p_te) * count_e
    counts = [sum(1 for t in range(T) if e in chosen[t]) for e in range(N)]
    expected = N / (top_k * T * T) * sum(
        sum(probs[t][e] for t in range(T)) * counts[e] for e in range(N)
    )
    assert r.loss_term.item() == pytest.approx(expected, rel=1e-5)


def test_topk_k1_router_gets_lm_gradient():
    """Not renormalised, so with k = 1 the router learns from the LM loss alone (aux loss excluded)."""
    torch.manual_seed(4)
    moe = MoE(16, 24, TopKRouter(16, 6, 1), use_grouped_mm=False)
    moe.init_weights(0.5, 0.5)
    x = torch.randn(2, 5, 16)
    rr = torch.randn(2, 5, 16)
    (moe(x) * rr).sum().backward()
    g = moe.router.gate.weight.grad
    assert g is not None and g.abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------
# 4. The MoE layer against a naive per-token reference
# ------------------------------------------------------------------------------------------------

B, S, D, H, N = 2, 6, 16, 24, 6
DEAD_EXPERT = 2
DEAD_TOKEN = (0, 3)  # flat index 3


def _rigged_layer(router, use_grouped_mm, top_k=2):
    """An MoE layer with an expert no token reaches, and (for ReLU) a token that reaches none."""
    torch.manual_seed(5)
    moe = MoE(D, H, make_router(router, D, N, top_k), use_grouped_mm=use_grouped_mm)
    moe.init_weights(0.3, 0.3)
    W = torch.randn(N, D)
    W[:, 0] = 0.0
    W[DEAD_EXPERT, 0] = -100.0  # feature 0 is 1 for every token: expert 2 always < 0
    W[:, 1] = -100.0  # feature 1 is 1 only for the dead token: all of its logits < 0
    with torch.no_grad():
        moe.router.gate.weight.copy_(W)
    x = torch.randn(B, S, D)
    x[..., 0] = 1.0
    x[..., 1] = 0.0
    x[DEAD_TOKEN + (1,)] = 1.0
    return moe, x


@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("router", ["relu", "topk"])
def test_moe_forward_matches_naive_reference(router, use_grouped_mm):
    moe, x = _rigged_layer(router, use_grouped_mm)
    y = moe(x)
    ex = moe.experts
    ref = naive_moe(x, moe.router.gate.weight, ex.w1, ex.w2, ex.w3, router, 2).detach()
    assert y.shape == x.shape
    close(y, ref)

    # the record: per-expert counts of active pairs, computed by hand
    logits = x.reshape(-1, D) @ moe.router.gate.weight.detach().T
    if router == "relu":
        mask = logits > 0
    else:
        mask = torch.zeros_like(logits, dtype=torch.bool)
        for t in range(B * S):
            for e in sorted(range(N), key=lambda e: -logits[t, e].item())[:2]:
                mask[t, e] = True
    rec = moe.pop_record()
    assert rec is not None and moe.pop_record() is None
    assert rec.num_tokens == B * S
    assert torch.equal(rec.tokens_per_expert, mask.sum(0).float())
    assert rec.tokens_per_expert[DEAD_EXPERT] == 0  # an expert with no tokens
    assert rec.loss_term.requires_grad
    if router == "relu":
        # a token with no active expert gets exactly zero from the MoE
        assert torch.equal(y[DEAD_TOKEN], torch.zeros(D))
        assert not mask[DEAD_TOKEN[1]].any()
        assert (mask.sum(1) != 2).any()  # variable number of experts per token


@pytest.mark.parametrize("router", ["relu", "topk"])
def test_moe_gradients_grouped_loop_and_reference_agree(router):
    r = torch.randn(B, S, D, generator=torch.Generator().manual_seed(6))
    grads = {}
    for name, use_grouped_mm in (("grouped_mm", True), ("loop", False)):
        moe, x = _rigged_layer(router, use_grouped_mm)
        x.requires_grad_(True)
        (moe(x) * r).sum().backward()
        grads[name] = {
            "w1": moe.experts.w1.grad, "w2": moe.experts.w2.grad, "w3": moe.experts.w3.grad,
            "router": moe.router.gate.weight.grad, "x": x.grad,
        }
    # the reference, by autograd through the token-by-token computation, same weights
    moe, x = _rigged_layer(router, True)
    params = {
        "w1": moe.experts.w1.detach().clone().requires_grad_(True),
        "w2": moe.experts.w2.detach().clone().requires_grad_(True),
        "w3": moe.experts.w3.detach().clone().requires_grad_(True),
        "router": moe.router.gate.weight.detach().clone().requires_grad_(True),
        "x": x.clone().requires_grad_(True),
    }
    y = naive_moe(params["x"], params["router"], params["w1"], params["w2"], params["w3"], router, 2)
    (y * r).sum().backward()
    for key, p in params.items():
        close(grads["grouped_mm"][key], grads["loop"][key])
        close(grads["grouped_mm"][key], p.grad)
    # the expert nobody reaches gets no gradient; the others do
    for key in ("w1", "w2", "w3"):
        for impl in ("grouped_mm", "loop"):
            g = grads[impl][key]
            assert torch.equal(g[DEAD_EXPERT], torch.zeros_like(g[DEAD_EXPERT]))
            assert g.abs().sum() > 0


@pytest.mark.parametrize("use_grouped_mm", [True, False], ids=["grouped_mm", "loop"])
@pytest.mark.parametrize("how", ["zero_router", "negative_router"])
def test_moe_layer_with_no_active_gate(how, use_grouped_mm):
    """A fully sparse layer (thu-ml/ReMoE issue #6): forward and backward work, the output is zero."""
    torch.manual_seed(7)
    moe = MoE(D, H, ReLURouter(D, N, 1, load_balance=True), use_grouped_mm=use_grouped_mm)
    moe.init_weights(0.3, 0.3)
    x = torch.rand(B, S, D) + 0.1  # positive inputs
    with torch.no_grad():
        if how == "zero_router":
            moe.router.gate.weight.zero_()
        else:
            moe.router.gate.weight.copy_(-torch.rand(N, D) - 0.1)
    x.requires_grad_(True)
    y = moe(x)
    assert torch.equal(y, torch.zeros(B, S, D))
    rec = moe.pop_record()
    assert torch.equal(rec.tokens_per_expert, torch.zeros(N))
    assert rec.loss_term.item() == 0.0
    loss = (y * torch.randn(B, S, D)).sum() + rec.loss_term
    loss.backward()
    for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3, moe.router.gate.weight, x):
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()
        assert torch.equal(p.grad, torch.zeros_like(p))


# ------------------------------------------------------------------------------------------------
# 5. The decoder: naive forward, router records, activation checkpointing
# ------------------------------------------------------------------------------------------------


def _small_args(router="relu", expert_impl="grouped_mm", granularity=1, ffn_expansion=1):
    return ReMoEModelArgs(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, vocab_size=64, max_seq_len=16,
        moe=MoEConfig(
            router=router, num_experts=4, top_k=1, granularity=granularity,
            ffn_expansion=ffn_expansion, expert_impl=expert_impl,
        ),
        flavor="test",
    )


def _small_model(seed=0, **kw):
    args = _small_args(**kw)
    args.validate()
    torch.manual_seed(seed)
    model = ReMoETransformer(args)
    model.init_weights()
    with torch.no_grad():  # larger weights than the 0.01 init, so that outputs are not ~0
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            else:
                p.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize(
    "kw", [dict(router="dense", ffn_expansion=2), dict(router="relu"), dict(router="topk", granularity=2)],
    ids=["dense_x2", "relu", "topk_G2"],
)
def test_transformer_matches_naive_forward(kw):
    model = _small_model(**kw)
    args = model.args
    tokens = torch.randint(0, args.vocab_size, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        logits = model(tokens)
        h = model.tok_embeddings.weight[tokens]
        for block in model.layers.values():
            h = naive_block(block, h, args)
        ref = rmsnorm(h, model.norm.weight, args.norm_eps) @ model.output.weight.T
    assert logits.shape == (2, 7, args.vocab_size)
    close(logits, ref, rtol=1e-4)
    if kw["router"] == "dense":
        assert model.layers["0"].feed_forward.w1.weight.shape == (2 * 64, 32)
    else:
        moe = model.layers["0"].moe
        G = kw.get("granularity", 1)
        assert moe.router.gate.weight.shape == (4 * G, 32)
        assert moe.experts.w1.shape == (4 * G, 64 // G, 32)
        assert moe.router.top_k == 1 * G


@pytest.mark.parametrize("router", ["relu", "topk"])
@pytest.mark.parametrize("router_init_std", [None, 0.05])
def test_router_init_std_sets_only_the_router_weights(router, router_init_std):
    args = ReMoEModelArgs(
        dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, vocab_size=64, max_seq_len=16, init_std=0.01,
        moe=MoEConfig(router=router, num_experts=8, top_k=1, router_init_std=router_init_std), flavor="test",
    )
    args.validate()
    torch.manual_seed(0)
    model = ReMoETransformer(args)
    model.init_weights()
    gates = torch.cat([layer.moe.router.gate.weight.flatten() for layer in model.layers.values()])
    w1 = torch.cat([layer.moe.experts.w1.flatten() for layer in model.layers.values()])
    # 4096 router and 1M expert samples of N(0, std): the sample std is within 5 % (router) and 1 % (w1)
    expected = 0.01 if router_init_std is None else router_init_std
    assert gates.std().item() == pytest.approx(expected, rel=0.05)
    assert abs(gates.mean().item()) < 4 * expected / math.sqrt(gates.numel())
    assert w1.std().item() == pytest.approx(0.01, rel=0.01)  # every other matrix keeps the model's init std
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.01, rel=0.01)


def test_pop_router_records_once_per_layer():
    model = _small_model()
    tokens = torch.randint(0, 64, (2, 8))
    model(tokens)
    records = model.pop_router_records()
    assert len(records) == model.args.n_layers
    for rec in records:
        assert rec.num_tokens == 16
        assert rec.tokens_per_expert.shape == (4,)
        assert 0 <= rec.tokens_per_expert.sum() <= 16 * 4
    assert model.pop_router_records() == []
    dense = _small_model(router="dense")
    dense(tokens)
    assert dense.pop_router_records() == []


def _lm_loss(model, tokens, records):
    logits = model(tokens)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.roll(-1, 1).reshape(-1))
    recs = model.pop_router_records() if records == "pop" else [
        layer.moe.record for layer in model.layers.values()
    ]
    return loss + 0.1 * sum(r.loss_term for r in recs), recs


@pytest.mark.parametrize("mode", [("full", "2"), ("selective", "op")], ids=["full", "op_sac"])
@pytest.mark.parametrize("router", ["relu", "topk"])
def test_activation_checkpointing_records_once_and_same_grads(router, mode):
    from torchtitan.distributed.activation_checkpoint import ACConfig, apply_ac

    model = _small_model(router=router)
    ac_model = copy.deepcopy(model)
    apply_ac(ac_model, ACConfig(mode=mode[0], selective_ac_option=mode[1]))
    assert type(ac_model.layers["0"]).__name__ == "CheckpointWrapper"
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(9))

    # pop after forward, backward (which recomputes every block), then nothing new may appear
    loss, recs = _lm_loss(model, tokens, "pop")
    ac_loss, ac_recs = _lm_loss(ac_model, tokens, "pop")
    assert len(ac_recs) == len(recs) == 2
    for a, b in zip(ac_recs, recs):
        assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)
        assert a.loss_term.item() == pytest.approx(b.loss_term.item(), rel=1e-6)
    loss.backward()
    ac_loss.backward()
    assert ac_model.pop_router_records() == []
    assert model.pop_router_records() == []
    ref_grads = dict(model.named_parameters())
    for name, p in ac_model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)

    # keep the records through backward: the recompute must not replace them
    ac_model.zero_grad()
    ac_loss, kept = _lm_loss(ac_model, tokens, "keep")
    ac_loss.backward()
    after = [layer.moe.record for layer in ac_model.layers.values()]
    assert all(a is b for a, b in zip(after, kept))
    assert len(ac_model.pop_router_records()) == 2


def test_plain_checkpoint_of_one_block_records_once():
    model = _small_model()
    block = model.layers["0"]
    x = torch.randn(2, 8, 32, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(block, x, model.freqs_cis, use_reentrant=False)
    rec = block.moe.pop_record()
    assert rec is not None
    (y.sum() + rec.loss_term).backward()
    assert block.moe.pop_record() is None
    g_ckpt = x.grad.clone()
    x.grad = None
    y2 = block(x, model.freqs_cis)
    (y2.sum() + block.moe.pop_record().loss_term).backward()
    torch.testing.assert_close(g_ckpt, x.grad)


# ------------------------------------------------------------------------------------------------
# 6. Parameter counts against the paper (Table 1, §4.1)
# ------------------------------------------------------------------------------------------------


def _flavor(name, **moe):
    args = copy.deepcopy(remoe_flavors()[name])
    args.moe = MoEConfig(**moe)
    args.validate()
    return args


# (dense total, MoE E=8 total, truncated to the paper's digits, GFLOPs/seq at 1024)
PAPER = {"182M": (182.4e6, 777e6, 995), "469M": (469.8e6, 2.58e9, 2873), "978M": (978.4e6, 5.73e9, 5991)}


@pytest.mark.parametrize("flavor", list(PAPER))
def test_param_counts_match_paper(flavor):
    dense_paper, moe_paper, _ = PAPER[flavor]
    dense = _flavor(flavor, router="dense").param_counts().total
    assert abs(dense - dense_paper) <= 0.1e6, dense
    relu = _flavor(flavor, router="relu", num_experts=8, top_k=1).param_counts().total
    topk = _flavor(flavor, router="topk", num_experts=8, top_k=1).param_counts().total
    assert relu == topk  # same router shape
    if moe_paper < 1e9:
        assert abs(relu - moe_paper) <= 0.5e6, relu
    else:
        # the paper prints three significant figures, truncated (978M: 5.735B -> "5.73B",
        # consistent with its 5991.9 -> "5991" GFLOPs)
        assert math.floor(relu / 1e7) == round(moe_paper / 1e7), relu
        assert abs(relu - moe_paper) < 0.01e9
    # Paper Table 1: MoE total = dense + (E - 1) * one layer-stack of FFNs + routers
    d, L = remoe_flavors()[flavor].dim, remoe_flavors()[flavor].n_layers
    assert relu - dense == (8 - 1) * L * 3 * d * 4 * d + L * d * 8


@pytest.mark.parametrize(
    "moe",
    [
        dict(router="relu", num_experts=8, top_k=1),
        dict(router="topk", num_experts=8, top_k=1, granularity=4),
        dict(router="dense"),
        dict(router="dense", ffn_expansion=8),
    ],
    ids=["relu_E8", "topk_E8_G4", "dense", "dense_x8"],
)
def test_param_counts_equal_built_model(moe):
    args = _flavor("182M", **moe)
    with torch.device("meta"):
        model = ReMoETransformer(args)
    counts = args.param_counts()
    assert counts.total == sum(p.numel() for p in model.parameters())
    routers = sum(
        p.numel() for n, p in model.named_parameters() if ".router." in n
    )
    experts = sum(
        p.numel() for n, p in model.named_parameters() if ".experts." in n or ".feed_forward." in n
    )
    assert counts.router == routers
    assert counts.ffn_total == experts
    assert counts.embedding == model.tok_embeddings.weight.numel()
    assert counts.output == model.output.weight.numel()


def test_dense_flops_per_sequence_match_paper():
    """Paper Table 1 GFLOPs/seq (995 / 2873 / 5991) = flops_per_token(1024) * 1024, truncated."""
    for flavor, (_, _, gflops) in PAPER.items():
        args = _flavor(flavor, router="dense")
        assert math.floor(args.flops_per_token(1024) * 1024 / 1e9) == gflops, flavor


# ------------------------------------------------------------------------------------------------
# 7. Granularity
# ------------------------------------------------------------------------------------------------


def test_granularity_keeps_params_and_flops_except_router():
    base = _flavor("182M", router="relu", num_experts=8, top_k=1, granularity=1)
    d, L, E = base.dim, base.n_layers, 8
    c1 = base.param_counts()
    for G in (1, 2, 4, 8):
        args = _flavor("182M", router="relu", num_experts=8, top_k=1, granularity=G)
        assert args.num_routed_experts == 8 * G and args.routed_top_k == G
        assert args.expert_dim == 3072 // G
        assert args.target_sparsity == pytest.approx(1 - 1 / 8)
        router_extra = L * d * E * (G - 1)
        c = args.param_counts()
        assert c.total - c1.total == router_extra
        assert c.ffn_total == c1.ffn_total
        assert args.active_params() - base.active_params() == pytest.approx(router_extra)
        assert args.flops_per_token(1024) - base.flops_per_token(1024) == pytest.approx(
            6 * router_extra
        )
        # the built model agrees (meta device: no memory)
        with torch.device("meta"):
            built = sum(p.numel() for p in ReMoETransformer(args).parameters())
        assert built == c1.total + router_extra


@pytest.mark.parametrize("flavor,G", [("182M", 5), ("debugmodel", 3), ("182M", 7)])
def test_validate_rejects_granularity_not_dividing_ffn(flavor, G):
    args = copy.deepcopy(remoe_flavors()[flavor])
    args.moe = MoEConfig(router="relu", num_experts=8, top_k=1, granularity=G)
    with pytest.raises(ConfigError, match=r"moe\.granularity"):
        args.validate()
    args.moe = MoEConfig(router="relu", num_experts=8, top_k=1, granularity=4)
    args.validate()  # a divisor is accepted


# ------------------------------------------------------------------------------------------------
# 8. [moe] validation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,overrides",
    [
        ("top_k", dict(top_k=8)),
        ("top_k", dict(top_k=9)),
        ("top_k", dict(top_k=0)),
        ("top_k", dict(top_k=-1)),
        ("top_k", dict(top_k=1.0)),
        ("top_k", dict(top_k=True)),  # bool is an int subclass: a TOML `true` is not a count
        ("router", dict(router="softmax")),
        ("router", dict(router="ReLU")),
        ("l1_coeff_multiplier", dict(l1_coeff_multiplier=1.0)),
        ("l1_coeff_multiplier", dict(l1_coeff_multiplier=0.8)),
        ("l1_coeff_init", dict(l1_coeff_init=0.0)),
        ("l1_coeff_init", dict(l1_coeff_init=-1e-8)),
        ("num_experts", dict(num_experts=8.0)),
        ("num_experts", dict(num_experts=True)),
        ("num_experts", dict(num_experts="8")),
        ("num_experts", dict(num_experts=1, top_k=1)),
        ("granularity", dict(granularity=0)),
        ("granularity", dict(granularity=2.0)),
        ("granularity", dict(granularity=True)),
        ("expert_impl", dict(expert_impl="triton")),
        ("load_balance", dict(load_balance="yes")),
        ("load_balance", dict(load_balance=1)),
        ("ffn_expansion", dict(ffn_expansion=8)),  # only the dense router widens the FFN
        ("ffn_expansion", dict(router="dense", ffn_expansion=0)),
        ("aux_loss_coeff", dict(router="topk", aux_loss_coeff=-0.01)),
        ("aux_loss_coeff", dict(aux_loss_coeff="0.01")),
        ("router_init_std", dict(router_init_std=0.0)),
        ("router_init_std", dict(router_init_std=-0.02)),
        ("router_init_std", dict(router_init_std="0.02")),
        ("router_init_std", dict(router="dense", router_init_std=0.02)),  # no router weights
        ("router_init_std", dict(router="hash", router_init_std=0.02)),
    ],
)
def test_moe_problems_name_the_key(key, overrides):
    problems = moe_problems(MoEConfig(**overrides))
    assert problems and all("\n" not in p for p in problems)
    assert any(p.startswith(f"moe.{key} = ") for p in problems), problems


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(router="topk", top_k=2, num_experts=16, granularity=4),
        dict(router="relu", top_k=7, num_experts=8, l1_coeff_multiplier=2),
        dict(router="dense", ffn_expansion=8),
        dict(router="relu", load_balance=False, expert_impl="loop"),
        dict(router="hash", top_k=2, granularity=2),
        dict(router="expert_choice", num_experts=16, router_init_std=0.05),
        dict(router="topk", router_init_std=1),
        dict(router="relu", router_init_std=0.025),
    ],
)
def test_moe_problems_none_for_valid(overrides):
    assert moe_problems(MoEConfig(**overrides)) == []


# ------------------------------------------------------------------------------------------------
# 9. Active FLOPs follow the measured sparsity
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("G", [1, 4])
def test_flops_linear_in_active_experts(G):
    args = _flavor("182M", router="relu", num_experts=8, top_k=1, granularity=G)
    d, L, Eg = 768, 12, 8 * G
    slope = 6 * L * 3 * d * (3072 // G)
    f0 = args.flops_per_token(1024, 0.0)
    for a in (0.5, 1.0, 2.5, float(Eg)):
        assert args.flops_per_token(1024, a) - f0 == pytest.approx(a * slope, rel=1e-12)
    # default = the target k * G experts; measured sparsity S gives a = (1 - S) * E * G
    assert args.flops_per_token(1024) == pytest.approx(args.flops_per_token(1024, float(G)))
    S = 0.8
    assert args.flops_per_token(1024, (1 - S) * Eg) - f0 == pytest.approx((1 - S) * Eg * slope)
    # and fully dense ReMoE (stage I, every expert on) costs E*G experts' worth
    assert args.active_params(float(Eg)) == pytest.approx(float(args.param_counts().total))
