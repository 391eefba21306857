"""Hugging Face export: the exported model in transformers reproduces the recipe's logits; the
conversion is lossless both ways; the tokenizer files encode as tiktoken does; bad input gives one
line; a checkpoint saved with expert parallelism exports the same tensors as a one-process one.

Parity tolerance: fp32 on CPU, max |logit difference| <= 1e-4 (measured ~2e-7 on logits of O(1); the
two implementations differ only in summation order and in RoPE's cos/sin evaluation). A layout error is
orders of magnitude larger: without the q/k RoPE permutation logits differ by O(1).
"""

import base64
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from remoe_recipe.data.tokenizer import BUILTIN_TOKENIZER, load_tokenizer, read_tiktoken_ranks
from remoe_recipe.export import export, main as export_main
from remoe_recipe.hf.convert import ReMoEStateDictAdapter, from_hf, to_hf
from remoe_recipe.hf.tokenizer import bytes_to_unicode
from remoe_recipe.load_checkpoint import load_trained_model
from tests.checkpoints import make_run, tree_snapshot
from tests.runs import CONFIGS, one_line_error, run_training

transformers = pytest.importorskip("transformers")

PARITY_ATOL = 1e-4
CASES = [("relu", 1), ("relu", 2), ("topk", 1), ("topk", 2), ("dense", 1)]
TEXTS = [
    "ROMEO. But, soft! what light through yonder window breaks?\n",
    "Numbers 1234 and 5,678.9 -- symbols @#$%^&*() and    spaces\n\n\tand tabs",
    "Unicode: naïve café, Ελληνικά, 日本語, emoji 🙂; it's, we'll, they've, I'd",
    "   leading and trailing spaces   ",
]


def _load_hf(out: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), trust_remote_code=True, output_loading_info=True, dtype=torch.float32
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def _hf_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.mark.parametrize("router,granularity", CASES)
def test_exported_model_reproduces_recipe_logits(tmp_path, router, granularity):
    saved = make_run(tmp_path / "run", router, "--moe.granularity", str(granularity))
    trained = load_trained_model(tmp_path / "run" / "checkpoint")
    out = export(trained, tmp_path / "hf")
    expected_class = "LlamaForCausalLM" if router == "dense" else "ReMoEForCausalLM"
    assert json.loads((out / "config.json").read_text())["architectures"] == [expected_class]
    assert (out / "modeling_remoe.py").exists() == (router != "dense")

    hf = _load_hf(out)
    assert type(hf).__name__ == expected_class
    tokens = torch.randint(0, 4097, (2, 48), generator=torch.Generator().manual_seed(1))
    experts_used = []
    for moe in saved.moe_layers():
        moe.router.register_forward_hook(lambda m, i, routing: experts_used.append(routing.mask.sum(-1)))
    with torch.no_grad():
        reference = saved(tokens)  # the model as it was before saving: the loader is under test too
        logits = hf(tokens).logits
    assert reference.abs().max() > 1.0  # logits large enough for a layout error to show
    assert (logits - reference).abs().max().item() <= PARITY_ATOL
    if router == "relu":
        used = torch.cat(experts_used)
        assert (used == 0).any() and (used >= 2).any(), "want tokens with zero and with several experts"


def test_hf_to_recipe_to_hf_is_identity(tmp_path):
    make_run(tmp_path / "run", "relu", "--moe.granularity", "2")
    trained = load_trained_model(tmp_path / "run" / "checkpoint")
    out = export(trained, tmp_path / "hf", max_shard_size="2MB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # sharded past the limit
    index = json.loads((out / "model.safetensors.index.json").read_text())
    hf = _hf_tensors(out)
    assert set(index["weight_map"]) == set(hf)
    recipe = from_hf(hf, trained.args)
    for name, tensor in trained.model.state_dict().items():
        assert torch.equal(recipe[name], tensor), name
    back = to_hf(recipe, trained.args)
    assert set(back) == set(hf)
    for name, tensor in hf.items():
        assert torch.equal(back[name], tensor), name
    # torchtitan's adapter (train spec) is the same mapping
    adapter = ReMoEStateDictAdapter(trained.args, None)
    via_adapter = adapter.to_hf(trained.model.state_dict())
    assert all(torch.equal(via_adapter[k], hf[k]) for k in hf) and set(via_adapter) == set(hf)


def _gpt2_layout_ranks_file(path: Path) -> Path:
    """A ranks file laid out like GPT-2's r50k_base: single bytes ranked in GPT-2's byte-to-unicode order
    (printable bytes first, not byte order), merges above them. Built from the bundled BPE's merges."""
    ranks = read_tiktoken_ranks(BUILTIN_TOKENIZER)
    order = list(bytes_to_unicode())  # GPT-2's rank order of the 256 bytes
    merged = sorted((r, t) for t, r in ranks.items() if len(t) > 1)

    lines = [f"{base64.b64encode(bytes([b])).decode()} {i}" for i, b in enumerate(order)]
    lines += [f"{base64.b64encode(t).decode()} {256 + i}" for i, (_, t) in enumerate(merged)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("which", ["gpt2_layout_file", "builtin"])
def test_exported_tokenizer_encodes_like_tiktoken(tmp_path, monkeypatch, which):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    spec = str(_gpt2_layout_ranks_file(tmp_path / "gpt2.tiktoken")) if which != "builtin" else "builtin"
    router = "dense" if which != "builtin" else "relu"  # a plain folder, and one with remote code
    make_run(tmp_path / "run", router, "--model.tokenizer_path", spec)
    out = export(load_trained_model(tmp_path / "run" / "checkpoint"), tmp_path / "hf")
    # transformers 5 reads config.json first: for a remote-code config it asks unless told
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=router != "dense")
    recipe_tok = load_tokenizer(spec)
    rng = random.Random(0)
    corpus = " ".join(TEXTS)
    samples = TEXTS + [corpus[i:i + rng.randint(1, 80)] for i in (rng.randrange(len(corpus)) for _ in range(50))]
    for text in samples:
        ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == recipe_tok.encode(text), text
        assert hf_tok.decode(ids) == text
    assert hf_tok.eos_token_id == recipe_tok.eos_id
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == recipe_tok.eos_id and config["vocab_size"] >= recipe_tok.get_vocab_size()


def _export_error(capsys, *argv) -> str:
    return one_line_error(capsys, export_main, *argv)


def test_bad_input_one_line_and_checkpoint_untouched(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run, "relu")
    before = tree_snapshot(run)
    ckpt = run / "checkpoint"
    (tmp_path / "empty").mkdir()
    assert "holds no checkpoint" in _export_error(capsys, "--checkpoint", tmp_path / "empty", "--out", tmp_path / "o1")
    assert "no step 7; the saved steps are [3]" in _export_error(capsys, "--checkpoint", ckpt, "--step", 7, "--out", tmp_path / "o2")
    message = _export_error(
        capsys, "--checkpoint", ckpt, "--out", tmp_path / "o3", "--config",
        CONFIGS / "debug_remoe.toml", "--", "--moe.granularity", "2",
    )
    assert "another model shape" in message and "layers.0.moe." in message
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    assert f"--out {busy}: exists and is not an empty folder" in _export_error(capsys, "--checkpoint", ckpt, "--out", busy)
    export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "ok")])
    assert tree_snapshot(run) == before  # nothing in the run folder was written


@pytest.mark.slow
def test_expert_parallel_and_torchtitan_hf_paths_give_the_exporters_tensors(tmp_path):
    """lr = 0 keeps every step's weights equal to the first, so all of these must hold identical tensors:
    A (one process): step 1 as DCP (full), step 2 written by --checkpoint.last_save_in_hf;
    B (2 processes, EP = 2, FSDP): started from A's HF folder with --checkpoint.initial_load_in_hf,
    step 1 as DCP (experts sharded), step 2 by last_save_in_hf (the adapter splits sharded experts)."""
    common = ["--optimizer.lr", "0", "--checkpoint.enable", "--checkpoint.interval", "1", "--moe.granularity", "2",
              "--training.steps", "2", "--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf"]
    run_training("debug_remoe.toml", tmp_path / "a", *common)
    hf_a = tmp_path / "a" / "checkpoint" / "step-2"
    run_training(
        "debug_remoe.toml", tmp_path / "b", *common, "--parallelism.expert_parallel_degree", "2",
        "--checkpoint.initial_load_path", str(hf_a), "--checkpoint.initial_load_in_hf",
        "--checkpoint.initial_load_model_only", "--debug.seed", "1", nproc=2,  # another init: equal only if loaded
    )
    assert len(list((tmp_path / "b" / "checkpoint" / "step-1").glob("*.distcp"))) == 2
    reference = _hf_tensors(export(load_trained_model(tmp_path / "a" / "checkpoint", step=1), tmp_path / "hf_a1"))
    candidates = {
        "A step 2 (last_save_in_hf)": _hf_tensors(hf_a),
        "B step 1 (DCP, EP = 2)": _hf_tensors(export(load_trained_model(tmp_path / "b" / "checkpoint", step=1),
                                                      tmp_path / "hf_b1")),
        "B step 2 (last_save_in_hf, EP = 2)": _hf_tensors(tmp_path / "b" / "checkpoint" / "step-2"),
    }
    for name, tensors in candidates.items():
        assert set(tensors) == set(reference), name
        assert all(torch.equal(tensors[k], reference[k]) for k in reference), name
    for folder in (hf_a, tmp_path / "b" / "checkpoint" / "step-2"):  # config, tokenizer, remote code were added
        assert type(_load_hf(folder)).__name__ == "ReMoEForCausalLM"
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
        assert tok.eos_token_id == load_tokenizer("builtin").eos_id


def test_start_up_probe_leaves_a_new_checkpoint_folder_absent(tmp_path):
    """torchtitan applies --checkpoint.initial_load_path (an exported HF folder, say) only while the run's
    checkpoint folder does not exist: the trainer's writability check must not create it."""
    from remoe_recipe.run_folder import check_writable

    check_writable(str(tmp_path / "run" / "checkpoint"))
    assert (tmp_path / "run").is_dir() and not (tmp_path / "run" / "checkpoint").exists()
    assert list((tmp_path / "run").iterdir()) == []  # the probe file is gone


def test_run_configuration_from_config_toml_or_a_one_line_error(tmp_path, capsys):
    """Without RUN/job_config.json the loader reads the trainer's resolved RUN/config.toml; without
    either, it asks for --config."""
    from remoe_recipe.preflight import load_config
    from remoe_recipe.run_log import save_config_toml

    run = tmp_path / "run"
    make_run(run, "topk", "--moe.granularity", "2")
    (run / "job_config.json").unlink()
    config = load_config(["--job.config_file", str(CONFIGS / "debug_topk.toml"), "--moe.granularity", "2",
                          "--job.dump_folder", str(run)], check_data=False)
    save_config_toml(config)
    trained = load_trained_model(run / "checkpoint")
    assert trained.args.moe.router == "topk" and trained.args.num_routed_experts == 16
    (run / "config.toml").unlink()
    message = _export_error(capsys, "--checkpoint", run / "checkpoint", "--out", tmp_path / "out")
    assert "no run configuration found" in message and "--config" in message


@pytest.mark.parametrize("router", ["hash", "expert_choice"])
def test_routers_without_remote_code_are_refused_before_training(router):
    """The HF remote code implements relu and topk (and dense is plain Llama): a run that would end in an
    HF save it cannot write is refused by the config check, naming the key, before step 1."""
    from remoe_recipe.config import ConfigError
    from remoe_recipe.preflight import load_config

    with pytest.raises(ConfigError) as info:
        load_config(["--job.config_file", str(CONFIGS / "debug_hash.toml"), "--moe.router", router,
                     "--checkpoint.last_save_in_hf", "--checkpoint.last_save_model_only"])
    [line] = str(info.value).splitlines()
    assert line.startswith(f"checkpoint.last_save_in_hf: moe.router = '{router}'") and "relu, topk, dense" in line
    load_config(["--job.config_file", str(CONFIGS / "debug_hash.toml"), "--moe.router", router])  # training is fine
