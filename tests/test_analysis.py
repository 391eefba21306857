"""Routing analysis and run comparison: numbers against independent counts, figures from a real checkpoint."""

import re
from pathlib import Path

import pytest
import torch

from remoe_recipe.analysis import compute_match, routing, runs
from remoe_recipe.data import load_tokenizer
from remoe_recipe.model.args import remoe_flavors
from remoe_recipe.model.model import ReMoETransformer
from remoe_recipe.preflight import load_config
from tests.runs import run_training


def test_analyse_counts_on_a_fixed_routing():
    tokenizer = load_tokenizer("builtin")
    token_ids = [5, 5, 5, 9, 9, 7] * 2
    domains = ["a"] * 6 + ["b"] * 6
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(2, 12, 4, generator=g) < 0.5  # [layers, tokens, experts]
    r = routing.analyse(token_ids, domains, masks, tokenizer, min_count=1)
    assert r["domains"] == ["a", "b"]
    for layer in range(2):
        for d, name in enumerate(["a", "b"]):
            rows = [t for t in range(12) if domains[t] == name]
            for e in range(4):
                expected = sum(bool(masks[layer, t, e]) for t in rows) / len(rows)
                assert r["share"][layer, d, e].item() == pytest.approx(expected)
            expected_active = sum(int(masks[layer, t].sum()) for t in rows) / len(rows)
            assert r["active_by_domain"][layer, d].item() == pytest.approx(expected_active)
        for c in range(5):
            expected = sum(int(masks[layer, t].sum()) == c for t in range(12)) / 12
            assert r["count_share"][layer, c].item() == pytest.approx(expected)
    assert r["frequency"] == {5: 6, 9: 4, 7: 2}
    for tok in (5, 9, 7):
        pos = [t for t in range(12) if token_ids[t] == tok]
        per_pos = [sum(int(masks[l, t].sum()) for l in range(2)) / 2 for t in pos]
        assert r["token_active"][tok] == pytest.approx(sum(per_pos) / len(per_pos))
    # Top tokens of layer 0, expert 0: rates computed by hand.
    rates = {
        tok: sum(bool(masks[0, t, 0]) for t in range(12) if token_ids[t] == tok) / token_ids.count(tok)
        for tok in (5, 9, 7)
    }
    listed = {text: rate for text, rate, _ in r["top_tokens"][0][0]}
    for tok, rate in rates.items():
        if rate > 0:
            assert listed[tokenizer.decode([tok])] == pytest.approx(rate)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    dump = tmp_path_factory.mktemp("tiny")
    # 4 experts per layer on the command line: not what debug_remoe.toml says (8).
    run_training(
        "debug_remoe.toml", dump, "--training.steps", "6", "--checkpoint.enable",
        "--checkpoint.interval", "6", "--moe.l1_coeff_init", "1e-3", "--moe.num_experts", "4",
    )
    return dump


def test_routing_report_from_a_trained_checkpoint(tiny_checkpoint, tmp_path):
    """No --config: the analysis reads the run's saved config.toml, overrides included."""
    out = tmp_path / "routing"
    routing.main([
        "--checkpoint", str(tiny_checkpoint / "checkpoint" / "step-6"), "--out", str(out), "--max-tokens", "3000",
    ])
    for name in ("dynamic_allocation.png", "domain_specialization.png", "active_experts_by_layer.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    report = (out / "report.md").read_text()
    assert "## Active experts per token by layer" in report
    assert all(f"| {layer} |" in report for layer in range(4))
    assert "## Tokens by number of active experts" in report
    assert "## Tokens most routed to each expert, layer 0" in report
    assert "## Tokens most routed to each expert, layer 3" in report
    plays = ("hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
             "midsummer_nights_dream", "twelfth_night", "merchant_of_venice")
    header = next(line for line in report.splitlines() if line.startswith("| layer |"))
    assert any(play in header for play in plays)  # domains are the built-in corpus's plays


def test_routing_rejects_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        routing.main(["--config", "train_configs/debug_remoe.toml", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")])


def test_runs_figure_has_every_panel(tiny_checkpoint, tmp_path):
    topk = tmp_path / "topk"
    run_training("debug_topk.toml", topk, "--training.steps", "4")
    scalars = {"remoe": runs.read_run(tiny_checkpoint), "topk": runs.read_run(topk)}
    drawn = runs.plot_runs(scalars, tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert drawn["training loss"] == 2
    assert drawn["sparsity (fraction of zero gates)"] == 2
    assert drawn["λ (L1 coefficient)"] == 1  # TopK has no lambda
    assert drawn["per-layer sparsity"] == 8  # 4 layers x 2 runs
    assert drawn["validation loss"] == 0  # validation is off in these short runs
    with pytest.raises(FileNotFoundError, match="no TensorBoard event files"):
        runs.read_run(tmp_path / "nothing")


def test_active_experts_are_interpolated_between_logged_steps():
    values = compute_match.active_per_step({1: 8.0, 11: 3.0, 21: 1.0}, 25)
    assert len(values) == 25
    assert values[0] == 8.0 and values[5] == pytest.approx(5.5) and values[10] == 3.0  # steps 1, 6, 11
    assert values[15] == pytest.approx(2.0) and values[20:] == [1.0] * 5  # step 16; flat after the last log
    assert compute_match.run_length({1: 8.0, 10: 3.0}, 15, 10) == 15  # steps 11-15 were not logged
    assert compute_match.run_length({1: 8.0, 10: 3.0}, 30, 10) == 10  # the run stopped at step 10


def test_compute_matched_topk_steps_from_a_relu_run(tiny_checkpoint, capsys):
    """Against an independent count of the FLOPs per token: the model's own parameters (on the meta device), 6
    FLOPs per matrix parameter a token passes through plus the attention scores, per step from the log."""
    compute_match.main([str(tiny_checkpoint)])
    got = float(re.search(r"compute-matched TopK: ([\d.]+) steps", capsys.readouterr().out).group(1))

    active = runs.read_run(tiny_checkpoint)["moe/active_experts_per_token"]
    assert sorted(active) == list(range(1, 7))  # logged every step: no interpolation
    config = load_config(["--job.config_file", str(tiny_checkpoint / "config.toml")])
    args = remoe_flavors()[config.model.flavor]
    args.update_from_config(config)
    with torch.device("meta"):
        model = ReMoETransformer(args)
    params = dict(model.named_parameters())
    expert = sum(p.numel() for n, p in params.items() if ".moe.experts." in n) / (args.n_layers * 4)
    shared = sum(p.numel() for n, p in params.items() if ".moe.experts." not in n and n != "tok_embeddings.weight")
    seq_len = config.training.seq_len
    attention = 6 * args.n_layers * seq_len * 2 * args.dim  # QK^T and AV: 2 * seq_len * dim MACs per layer

    def flops(active_experts):
        return 6 * (shared + args.n_layers * active_experts * expert) + attention

    expected = sum(flops(a) for a in active.values()) / flops(1)
    assert got == pytest.approx(expected, abs=0.005)
    assert got > 6  # stage I is denser than TopK's one expert per token


def test_runs_with_the_same_folder_name_are_kept_apart(tmp_path):
    dirs = [tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "c"]
    assert runs.run_names(dirs) == ["a/run", "b/run", f"{tmp_path.name}/c"]
    assert runs.run_names([tmp_path / "x", tmp_path / "y"]) == ["x", "y"]
    with pytest.raises(SystemExit, match="the same run folder is given twice"):
        runs.run_names([tmp_path / "x", tmp_path / "x"])


def test_single_validation_points_and_layer_lines_are_drawn(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = {
        "validation_metrics/loss": {10: 5.0},
        "moe_layers/sparsity/layer_0": {1: 0.5, 2: 0.6},
        "moe_layers/sparsity/layer_1": {1: 0.4, 2: 0.7},
    }
    captured = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        captured["fig"] = fig
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = keep
    try:
        drawn = runs.plot_runs({"a/run": scalars, "b/run": scalars}, tmp_path / "r.png")
    finally:
        plt.Figure.savefig = real_savefig
    assert drawn["validation loss"] == 2 and drawn["per-layer sparsity"] == 4
    axes = {ax.get_title(): ax for ax in captured["fig"].axes}
    validation = axes["validation loss"]
    assert all(line.get_marker() == "o" for line in validation.lines)  # one point is visible
    assert [t.get_text() for t in validation.texts] == ["5.000 @ step 10"] * 2
    labels = [line.get_label() for line in axes["per-layer sparsity"].lines]
    assert labels == ["a/run layer 0", "a/run layer 1", "b/run layer 0", "b/run layer 1"]
