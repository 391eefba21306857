"""Tests of weighted mixing of several sources (data.mix): proportions, order, exact resume."""

import json
import pickle

import pytest
import torch
from torchtitan.config import JobConfig

from remoe_recipe.data import build_dataloader, load_tokenizer
from remoe_recipe.data.config import Data
from remoe_recipe.data.mixing import MixedDataset, parse_mix_entry


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


class Counter(torch.utils.data.IterableDataset):
    """An infinite component yielding (name, 0), (name, 1), ...; its state is the next number."""

    def __init__(self, name):
        self.name, self.n = name, 0

    def __iter__(self):
        while True:
            self.n += 1
            yield self.name, self.n - 1

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, s):
        self.n = s["n"]


def test_counts_track_weights():
    weights = [5.0, 3.0, 2.0]
    mix = MixedDataset([Counter(c) for c in "abc"], weights)
    seen = {c: 0 for c in "abc"}
    for n, (_, (name, i)) in enumerate(zip(range(1000), mix), 1):
        assert i == seen[name]  # each component continues its own order
        seen[name] += 1
        for c, w in zip("abc", weights):  # never more than one sample off the exact share
            assert abs(seen[c] - n * w / 10) <= 1
    assert seen == {"a": 500, "b": 300, "c": 200}


def test_order_is_megatrons_blending():
    # Naive reimplementation of Megatron's blended-dataset index: argmax of w*(n+1) - count.
    weights = [0.7, 0.2, 0.1]
    counts, expected = [0, 0, 0], []
    for n in range(200):
        errors = [w * (n + 1) - c for w, c in zip(weights, counts)]
        i = errors.index(max(errors))
        counts[i] += 1
        expected.append("abc"[i])
    mix = MixedDataset([Counter(c) for c in "abc"], [7, 2, 1])
    assert [name for name, _ in (s for _, s in zip(range(200), mix))] == expected


def test_state_resumes_mid_mix():
    mix = MixedDataset([Counter("a"), Counter("b")], [1, 3])
    it = iter(mix)
    for _ in range(7):
        next(it)
    state = pickle.loads(pickle.dumps(mix.state_dict()))
    expected = [next(it) for _ in range(20)]
    again = MixedDataset([Counter("a"), Counter("b")], [1, 3])
    again.load_state_dict(state)
    assert [s for _, s in zip(range(20), again)] == expected


@pytest.mark.parametrize("entry", ["x", "0 a.jsonl", "-1 a.jsonl", "1.5", "abc a.jsonl"])
def test_bad_mix_entry(entry):
    with pytest.raises(ValueError, match=r"data\.mix entry"):
        parse_mix_entry(entry)


def write_jsonl(path, texts, label):
    path.write_text("".join(json.dumps({"text": t, "meta": {"pile_set_name": label}}) + "\n" for t in texts))
    return path


def job_config(mix, seq_len=8, batch=4, workers=0):
    jc = JobConfig()
    jc.data = Data(mix=mix)
    jc.training.seq_len, jc.training.local_batch_size = seq_len, batch
    jc.training.dataloader.num_workers = workers
    return jc


@pytest.fixture
def two_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [f"alpha document {i} " * 3 for i in range(12)], "A")
    b = write_jsonl(tmp_path / "b.jsonl", [f"beta text number {i} " * 2 for i in range(12)], "B")
    return a, b


def test_loader_mixes_local_and_builtin(tok, two_sources):
    a, _ = two_sources
    L, B = 8, 4
    jc = job_config([f"3 {a}", "1 shakespeare"], seq_len=L, batch=B)
    stream_a = [t for i in range(12) for t in tok.encode(f"alpha document {i} " * 3) + [tok.eos_id]]
    batches = take(build_dataloader(1, 0, tok, jc, return_source=True), 6)
    rows = [(x["input"][r].tolist(), x["source"][r]) for x, _ in batches for r in range(B)]
    from_a = [ids for ids, label in rows if label == "A"]
    assert len(from_a) == 18 and len(rows) - len(from_a) == 6  # 3 : 1
    assert from_a == [stream_a[k * L : k * L + L] for k in range(18)]  # A's samples in A's order
    assert {label for _, label in rows} - {"A"} <= {
        "hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest",
        "midsummer_nights_dream", "twelfth_night", "merchant_of_venice",
    }


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_mixed_loader_exact_resume(tok, two_sources, workers):
    a, b = two_sources
    jc = job_config([f"2 {a}", f"1 {b}"], seq_len=6, batch=3, workers=workers)
    loader = build_dataloader(2, 1, tok, jc)
    it = iter(loader)
    for _ in range(4):
        next(it)
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    expected = [next(it) for _ in range(10)]
    resumed = build_dataloader(2, 1, tok, jc)
    resumed.load_state_dict(state)
    got = take(resumed, 10)
    assert all(torch.equal(x1["input"], x2["input"]) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(got, expected))


def test_mix_entry_errors_name_the_entry(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data\.mix entry '1 \./nope\.jsonl'.*no such file"):
        build_dataloader(1, 0, tok, job_config(["1 ./nope.jsonl"]))
