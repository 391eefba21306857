"""The MoE layer as a GPU runs it: host synchronisations, a deterministic fp32 combine, and the chunked
dense start, all checked on CPU.

Host syncs are counted with a TorchDispatchMode (plus a TorchFunctionMode for `tolist`, which a CPU
tensor answers without dispatching): every op whose output shape or value must reach the host before
the next op can be queued. The reference is torchtitan 0.2.2's own TopK MoE layer in the same setting,
counted by the same counter; a positive control shows the counter sees each kind of sync.
"""

import functools

import pytest
import torch
import torchtitan.models.moe.utils as tt_moe_utils
from torch.utils._python_dispatch import TorchDispatchMode
from torchtitan.models.moe.moe import MoE as TorchtitanMoE, MoEArgs

from remoe_recipe.model.moe import MoE
from tests.moe_layers import make_router

# ------------------------------------------------------------------------------------------------
# the counter
# ------------------------------------------------------------------------------------------------

# Ops whose output size depends on tensor values (the host must read it to allocate) or that return a
# value to the host.
DATA_DEPENDENT = {
    "aten.nonzero.default", "aten.masked_select.default", "aten._local_scalar_dense.default",
    "aten.unique_dim.default", "aten._unique.default", "aten._unique2.default",
    "aten.unique_consecutive.default", "aten.masked_scatter.default", "aten.masked_scatter_.default",
}


def _is_bool_index(func, args) -> bool:
    name = str(func)
    if not (name.startswith("aten.index.") or name.startswith("aten.index_put")):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncCounter:
    """Counts host syncs by kind; `pause()` excludes a region (a CPU twin of a sync-free GPU kernel)."""

    def __init__(self):
        self.events: list[str] = []
        self.paused = False
        counter = self

        class Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if not counter.paused:
                    name = str(func)
                    if name in DATA_DEPENDENT or _is_bool_index(func, args):
                        counter.events.append(name)
                    elif name == "aten.repeat_interleave.Tensor" and kwargs.get("output_size") is None:
                        counter.events.append(name)
                    elif name == "aten._to_copy.default" and kwargs.get("device") is not None:
                        src = args[0].device
                        if src.type != "cpu" and torch.device(kwargs["device"]).type == "cpu":
                            counter.events.append(name + " (device to host)")
                    elif name == "aten.lift_fresh.default":
                        counter.events.append("host data uploaded (torch.tensor)")
                return func(*args, **kwargs)

        self._mode = Dispatch()

    def _count_host_read(self, method):
        counter = self

        @functools.wraps(method)
        def read(tensor, *args, **kwargs):
            if not counter.paused:
                counter.events.append(method.__name__)
            return method(tensor, *args, **kwargs)
        return read

    def __enter__(self):
        # `tolist`/`numpy` of a CPU tensor read memory without dispatching (on a GPU they dispatch a
        # device-to-host copy): count them at the method. A patch, not a TorchFunctionMode, because
        # function modes do not reach the autograd engine (backward, checkpoint recomputes).
        self._saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, self._count_host_read(method))
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, method in self._saved.items():
            setattr(torch.Tensor, name, method)

    def pause(self, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            self.paused = True
            try:
                return fn(*args, **kwargs)
            finally:
                self.paused = False
        return run


def count_step(layer, x, counter_setup=None) -> tuple[list[str], list[str]]:
    """Syncs of one forward and of one backward of `layer` on `x`."""
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    with SyncCounter() as fwd:
        if counter_setup:
            counter_setup(fwd)
        y = layer(x)
        loss = (y * r).sum()
    with SyncCounter() as bwd:
        loss.backward()
    return fwd.events, bwd.events


def test_counter_sees_each_kind_of_sync():
    """Positive control: each of the host-sync patterns the old dispatch had is counted."""
    x = torch.randn(8, 4)
    mask = x[:, 0] > 0
    for op in (
        lambda: mask.nonzero(),
        lambda: x[mask],  # boolean-mask indexing
        lambda: x.new_zeros(8, 4).index_put_((mask,), torch.ones(4)),
        lambda: int(mask.sum()),  # .item()
        lambda: mask.sum().tolist(),
        lambda: torch.tensor([1.0, 2.0]),  # host data into a (device) tensor
        lambda: torch.repeat_interleave(torch.tensor([1, 2]).clone()),
    ):
        with SyncCounter() as c:
            op()
        assert c.events, op

    class ReadsInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, v):
            return v * 2

        @staticmethod
        def backward(ctx, g):
            g.nonzero()
            g.sum().tolist()
            return g * 2

    y = ReadsInBackward.apply(torch.randn(3, requires_grad=True)).sum()
    with SyncCounter() as c:  # also inside the autograd engine
        y.backward()
    assert c.events == ["aten.nonzero.default", "tolist"]
    with SyncCounter() as c:  # and sync-free ops are not
        idx = torch.arange(4)
        x.index_select(0, idx).sum(0)
        torch.nonzero_static(mask, size=3)
        torch.zeros(8, 4).index_add_(0, idx, x[:4])
    assert c.events == []


# ------------------------------------------------------------------------------------------------
# the reference: torchtitan 0.2.2's TopK MoE layer, non-EP grouped path
# ------------------------------------------------------------------------------------------------

T, D, H, N = 64, 16, 32, 8


def _torchtitan_layer(top_k=2):
    args = MoEArgs(
        num_experts=N, num_shared_experts=0, score_func="softmax", route_norm=False, top_k=top_k,
        score_before_experts=False, load_balance_coeff=None, use_grouped_mm=True,
    )
    torch.manual_seed(0)
    layer = TorchtitanMoE(args, dim=D, hidden_dim=H)
    with torch.no_grad():
        layer.init_weights(0.1, torch.device("cpu"))
    return layer


def _recipe_layer(router, top_k=2, align_rows=8, **kw):
    torch.manual_seed(0)
    layer = MoE(D, H, make_router(router, D, N, top_k), use_grouped_mm=True, **kw)
    layer.init_weights(0.3, 0.3)
    layer.experts.align_rows = align_rows
    return layer


def _input(dtype=torch.float32):
    return torch.randn(2, T // 2, D, generator=torch.Generator().manual_seed(2), dtype=dtype).requires_grad_()


@pytest.fixture
def cpu_permute_twin(monkeypatch):
    """torchtitan on CPU as on GPU. It pads groups with a Triton kernel (sync-free) on GPU; on CPU its
    twin loops with `.item()`: run the twin with counting paused, so the count is the GPU path's.
    Its router counts experts with `torch.histc` on integers, which only CUDA implements: count the
    same values as floats (the same sync-free op)."""
    histc = torch.histc
    monkeypatch.setattr(torch, "histc", lambda t, **kw: histc(t.float(), **kw).to(t.dtype))

    def install(counter):
        original = tt_moe_utils.generate_permute_indices
        monkeypatch.setattr(
            tt_moe_utils, "generate_permute_indices",
            counter.pause(functools.partial(original, use_cpu=True)),
        )
    return install


def test_torchtitan_topk_layer_does_no_sync_without_ep(cpu_permute_twin):
    fwd, bwd = count_step(_torchtitan_layer(), _input(), cpu_permute_twin)
    assert fwd == [] and bwd == []


# ------------------------------------------------------------------------------------------------
# the recipe's layer: TopK 0 (as torchtitan), ReLU 1 (the number of pairs), none in backward
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("align_rows", [8, 1], ids=["cuda_layout", "cpu_layout"])
@pytest.mark.parametrize("router,expected", [("topk", 0), ("relu", 1)])
def test_moe_layer_syncs(router, expected, align_rows, cpu_permute_twin):
    reference_fwd, _ = count_step(_torchtitan_layer(), _input(), cpu_permute_twin)
    fwd, bwd = count_step(_recipe_layer(router, align_rows=align_rows), _input())
    assert len(fwd) == expected, fwd
    assert len(fwd) <= len(reference_fwd) + (1 if router == "relu" else 0)
    if router == "relu":
        assert fwd == ["aten._local_scalar_dense.default"]  # the pair count, read once
    assert bwd == [], bwd


@pytest.mark.parametrize("router", ["topk", "relu"])
def test_checkpoint_recompute_reads_nothing_in_backward(router):
    """Activation checkpointing re-runs the layer's forward inside backward: it reuses the pair count
    of its forward instead of reading it again."""
    layer = _recipe_layer(router)
    x = _input()
    fwd, bwd = count_step(
        lambda v: torch.utils.checkpoint.checkpoint(layer, v, use_reentrant=False), x
    )
    assert len(fwd) == (1 if router == "relu" else 0)
    assert bwd == [], bwd


@pytest.fixture
def small_device(monkeypatch):
    """Auto chunking weighs the pairs' memory against the device's: make the device tiny."""
    import remoe_recipe.model.moe as moe_module

    monkeypatch.setattr(moe_module, "device_memory_bytes", lambda device: 1024)


def test_chunked_dense_start_syncs(small_device):
    layer = _recipe_layer("relu", top_k=1, pair_chunk_size=-1)
    with torch.no_grad():
        layer.router.gate.weight.abs_()  # inputs below are positive: every gate open, fully dense
    x = _input().detach().abs().requires_grad_()
    fwd, bwd = count_step(layer, x)
    assert layer.last_num_chunks == N  # T*N pairs in chunks of T*k
    assert len(fwd) == 1 and bwd == []


def test_routing_stats_cost_no_sync_per_micro_batch():
    from remoe_recipe.model.moe import RouterRecord
    from remoe_recipe.routing_stats import StepRoutingStats

    layers = 3
    stats = StepRoutingStats(layers, N, torch.device("cpu"))
    records = [
        RouterRecord(loss_term=torch.tensor(0.5), tokens_per_expert=torch.arange(N).float(), num_tokens=T)
        for _ in range(layers)
    ]
    lm_sum, lm_tokens = torch.tensor(3.0), torch.tensor(T)
    with SyncCounter() as c:
        stats.add(records, lm_sum, lm_tokens)
        stats.add(records, lm_sum, lm_tokens)
    assert c.events == []
    reduced = stats.reduce(None)
    # independent expectation: active pairs / (tokens * experts) over 2 micro-batches of 3 layers
    active = 2 * layers * sum(range(N))
    assert reduced.sparsity.item() == pytest.approx(1 - active / (2 * layers * T * N))


# ------------------------------------------------------------------------------------------------
# the combine: fp32 accumulation, bitwise reproducible
# ------------------------------------------------------------------------------------------------


def _grads_of_step(router, seed=0, dtype=torch.float32, **kw):
    layer = _recipe_layer(router, align_rows=None, **kw).to(dtype)
    x = _input(dtype)
    r = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 7)).to(dtype)
    (layer(x) * r).sum().backward()
    return [x.grad] + [p.grad for p in layer.parameters()]


@pytest.mark.parametrize("router", ["relu", "topk"])
def test_seeded_step_gives_bitwise_identical_gradients(router):
    first, second = _grads_of_step(router), _grads_of_step(router)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # and under torch.use_deterministic_algorithms (what --debug.deterministic sets) every op of the
    # step has a deterministic kernel (none raises) and the result is the same
    torch.use_deterministic_algorithms(True)
    try:
        third = _grads_of_step(router)
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(a, b) for a, b in zip(first, third))


class _RecordDtypes(TorchDispatchMode):
    """Appends the dtypes of the given arguments of every op whose name starts with `prefix` to `seen`."""

    def __init__(self, prefix: str, arg_indices: tuple[int, ...], seen: list):
        super().__init__()
        self.prefix, self.arg_indices, self.seen = prefix, arg_indices, seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func).startswith(self.prefix):
            self.seen.append(tuple(args[i].dtype for i in self.arg_indices))
        return func(*args, **(kwargs or {}))


def test_combine_accumulates_in_fp32_with_bf16_activations():
    layer = _recipe_layer("relu", align_rows=None, pair_chunk_size=0).to(torch.bfloat16)
    seen = []
    x = _input(torch.bfloat16)
    with _RecordDtypes("aten.index_add", (0, 3), seen):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert seen == [(torch.float32, torch.float32)]  # one combine, accumulator and addends in fp32


# ------------------------------------------------------------------------------------------------
# the dense start in chunks: same loss and gradients, less memory kept for backward
# ------------------------------------------------------------------------------------------------


def _dense_layer(pair_chunk_size, align_rows=8):
    layer = _recipe_layer("relu", top_k=1, align_rows=align_rows, pair_chunk_size=pair_chunk_size)
    with torch.no_grad():  # ReMoE's stage I: most gates open (inputs below have a positive feature 0)
        layer.router.gate.weight[:, 0] = 3.0
    return layer


def _dense_input():
    x = _input().detach()
    x[..., 0] = 1.0
    return x.requires_grad_()


def _saved_bytes(fn):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total


@pytest.mark.parametrize("chunk,align_rows", [(-1, 8), (-1, 1), (37, 8), (37, 1)])
def test_chunked_dense_start_same_loss_and_grads(chunk, align_rows, small_device):
    from tests.test_model import close, naive_moe

    results = {}
    for name, size in (("whole", 0), ("chunked", chunk)):
        layer, x = _dense_layer(size, align_rows), _dense_input()
        r = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        y, saved = _saved_bytes(lambda: layer(x))
        loss = (y * r).sum()
        loss.backward()
        results[name] = dict(
            y=y.detach(), loss=loss.detach(), saved=saved, chunks=layer.last_num_chunks,
            grads=[x.grad] + [p.grad for p in layer.parameters()],
        )
    whole, chunked = results["whole"], results["chunked"]
    assert whole["chunks"] == 1 and chunked["chunks"] > 2
    # same terms in the same order; only the expert GEMMs' blocking may differ with the row count
    close(chunked["y"], whole["y"])
    close(chunked["loss"], whole["loss"])
    for a, b in zip(chunked["grads"], whole["grads"]):
        close(a, b)
    # and both are the layer of the paper (naive token-by-token reference)
    ex = layer.experts
    ref = naive_moe(_dense_input().detach(), layer.router.gate.weight, ex.w1, ex.w2, ex.w3, "relu", 1)
    close(whole["y"], ref.detach())
    # what the layer keeps for backward: its input and gates instead of every pair's activations
    assert chunked["saved"] < whole["saved"] / 3


def test_auto_chunking_only_where_memory_needs_it(monkeypatch):
    """Auto chunks the dense start only when keeping all layers' pairs would take over half the device."""
    import remoe_recipe.model.moe as moe_module

    layer = _dense_layer(-1)
    layer.num_moe_layers = 12
    layer(_dense_input())
    kept = layer._forward_pairs * moe_module.pair_bytes(D, H, 4) * 12  # fp32 activations
    monkeypatch.setattr(moe_module, "device_memory_bytes", lambda device: 2 * kept + 1)
    layer(_dense_input())
    assert layer.last_num_chunks == 1
    monkeypatch.setattr(moe_module, "device_memory_bytes", lambda device: 2 * kept - 1)
    layer(_dense_input())
    assert layer.last_num_chunks == N


def test_auto_chunking_only_in_the_dense_start(small_device):
    sparse = _recipe_layer("relu", top_k=1, pair_chunk_size=-1)  # random gates: about half open
    with torch.no_grad():
        sparse.router.gate.weight[:, 0] = -3.0  # now about none open: stage III-like
    x = _dense_input()
    sparse(x)
    assert sparse.last_num_chunks == 1
    dense = _dense_layer(-1)
    dense(_dense_input())
    assert dense.last_num_chunks == N  # T*N pairs, chunks of T*k
    off = _dense_layer(0)
    off(_dense_input())
    assert off.last_num_chunks == 1


# ------------------------------------------------------------------------------------------------
# expert parallelism (torchtitan's ExpertParallel on a one-rank ep mesh, gloo)
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def ep_mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield init_device_mesh("cpu", (1,), mesh_dim_names=("ep",))
    finally:
        dist.destroy_process_group()


def _expert_parallel(layer, mesh):
    """The recipe's layers as infra/parallelize.py shards them; torchtitan's as torchtitan does."""
    from torch.distributed.tensor.parallel import parallelize_module
    from torchtitan.distributed.expert_parallel import ExpertParallel

    from remoe_recipe.infra.expert_parallel import TrimmingExpertParallel

    style = TrimmingExpertParallel() if isinstance(layer, MoE) else ExpertParallel()
    parallelize_module(layer.experts, mesh, style)
    return layer


def test_syncs_under_expert_parallelism(ep_mesh, cpu_permute_twin):
    """The split exchange costs what it costs torchtitan's layer (on CPU its one device-to-host copy
    shows as two `tolist` of host tensors), and neither router adds a read: ReLU's pair count comes
    with the split sizes (the exchange trims a static-size buffer)."""
    reference, _ = count_step(_expert_parallel(_torchtitan_layer(), ep_mesh), _input(), cpu_permute_twin)
    assert reference  # the exchange's split sizes reach the host
    topk_fwd, topk_bwd = count_step(_expert_parallel(_recipe_layer("topk"), ep_mesh), _input(), cpu_permute_twin)
    relu_fwd, relu_bwd = count_step(
        _expert_parallel(_recipe_layer("relu", pair_chunk_size=0), ep_mesh), _input(), cpu_permute_twin
    )
    assert topk_fwd == reference and topk_bwd == []
    assert relu_fwd == reference and relu_bwd == []


def test_dense_start_under_expert_parallelism_recomputes_the_experts(ep_mesh, cpu_permute_twin, small_device):
    """Under EP the layer does not chunk: ranks with different pair counts would run different numbers
    of exchanges. It exchanges once and recomputes the local SwiGLU in backward: same output and
    gradients, less kept, no host sync in backward."""
    from tests.test_model import close

    results = {}
    for size in (0, -1):
        layer, x = _expert_parallel(_dense_layer(size), ep_mesh), _dense_input()
        r = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        counter = SyncCounter()
        cpu_permute_twin(counter)
        with counter:
            y, saved = _saved_bytes(lambda: layer(x))
        forward_events = list(counter.events)
        counter.events.clear()
        with counter:
            (y * r).sum().backward()
        grads = [x.grad] + [getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for p in layer.parameters()]
        results[size] = (y.detach(), saved, forward_events, counter.events, grads, layer.last_num_chunks)
    (y0, saved0, fwd0, bwd0, g0, chunks0), (y1, saved1, fwd1, bwd1, g1, chunks1) = results[0], results[-1]
    close(y1, y0)
    for a, b in zip(g1, g0):
        close(a, b)
    assert saved1 < saved0 / 2
    assert chunks0 == chunks1 == 1
    assert fwd1 == fwd0  # one pair count and one exchange, as without the option
    assert bwd0 == bwd1 == []


@pytest.mark.parametrize("value", [-2, 1.5, True, "auto"])
def test_validate_rejects_pair_chunk_size(value):
    from remoe_recipe.config import MoEConfig, moe_problems

    assert [p for p in moe_problems(MoEConfig(pair_chunk_size=value)) if p.startswith("moe.pair_chunk_size")]
    for ok in (-1, 0, 4096):
        assert moe_problems(MoEConfig(pair_chunk_size=ok)) == []


def test_experts_run_in_the_autocast_dtype():
    """A one-GPU run trains fp32 weights under bf16 autocast (torchtitan without FSDP): the grouped
    GEMMs must run in bf16, as torchtitan's grouped path does, not in the residual stream's fp32."""
    layer = _recipe_layer("topk", align_rows=None)
    seen = []
    x = _input()
    with torch.autocast("cpu", dtype=torch.bfloat16), _RecordDtypes("aten._grouped_mm", (0, 1), seen):
        y = layer(x)
    assert seen and all(d == (torch.bfloat16, torch.bfloat16) for d in seen)
    assert y.dtype == torch.float32  # the layer returns the residual stream's dtype


def test_compiled_router_keeps_topk_sync_free():
    """infra/compile.py wraps the router in torch.compile: TopK must still know its pair count without
    reading it (on an H200 a type check on the wrapped router once cost one sync per layer)."""
    layer = _recipe_layer("topk")
    # the wrapper is what matters (dynamo runs no graph under a dispatch mode, so no fullgraph here)
    layer.router = torch.compile(layer.router, backend="eager")
    assert type(layer.router).__name__ == "OptimizedModule"
    fwd, bwd = count_step(layer, _input())
    assert fwd == [] and bwd == []


@pytest.mark.parametrize("router", ["relu", "topk"])
def test_expert_parallel_layer_matches_the_plain_layer(router, ep_mesh, cpu_permute_twin):
    """The trimmed exchange computes the same layer: output and gradients as without expert parallelism."""
    from tests.test_model import close

    cpu_permute_twin(SyncCounter())
    results = []
    for sharded in (False, True):
        layer = _recipe_layer(router, align_rows=None, pair_chunk_size=0)
        if sharded:
            _expert_parallel(layer, ep_mesh)
        x = _input()
        r = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
        y = layer(x)
        (y * r).sum().backward()
        grads = [x.grad] + [getattr(p.grad, "full_tensor", lambda g=p.grad: g)() for p in layer.parameters()]
        results.append((y.detach(), grads))
    (y0, g0), (y1, g1) = results
    close(y1, y0)
    for a, b in zip(g1, g0):
        close(a, b)
