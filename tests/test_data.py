"""Tests of remoe_recipe.data: tokenizers, sources, packing, sharding, exact resume, errors."""

import base64
import gzip
import json
import pickle

import pytest
import tiktoken.load
import torch
from torchtitan.config import JobConfig

from remoe_recipe.data import (
    build_dataloader,
    build_tiktoken_tokenizer,
    build_validation_dataloader,
    load_tokenizer,
    PackedTextDataset,
    resolve_source,
)
from remoe_recipe.data.sources import BUILTIN_CORPUS
from remoe_recipe.model import padded_vocab_size
from remoe_recipe.data.tokenizer import BUILTIN_TOKENIZER, read_tiktoken_ranks

EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


@pytest.fixture(scope="module")
def corpus():
    """The built-in corpus read independently of the package's readers."""
    with gzip.open(BUILTIN_CORPUS, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def job_config(section="training", seq_len=32, batch=2, dataset="shakespeare", path=None, workers=0):
    jc = JobConfig()
    cfg = getattr(jc, section)
    cfg.dataset, cfg.dataset_path = dataset, path
    cfg.seq_len, cfg.local_batch_size = seq_len, batch
    cfg.dataloader.num_workers = workers
    return jc


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return str(path)


def packed_stream(tok, texts):
    return [t for text in texts for t in tok.encode(text) + [tok.eos_id]]


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.keys() == xb.keys()
        assert torch.equal(xa["input"], xb["input"]) and torch.equal(ya, yb)


# ---------------------------------------------------------------- tokenizer


def test_builtin_tokenizer_vocab_and_eos(tok):
    assert tok.get_vocab_size() == tok.n_words == 4096
    assert tok.eos_id == 4095 == tok.n_words - 1  # EOS is the last id
    assert tok.bos_id is None
    assert tok.encode("To be, or not to be", add_eos=True)[-1] == tok.eos_id
    # No BOS token exists: add_bos is accepted (torchtitan passes it) and adds nothing.
    assert tok.encode("To be", add_bos=True) == tok.encode("To be")


@pytest.mark.parametrize(
    "text",
    [
        "To be, or not to be: that is the question.\n\nHAMLET.\nAy, marry, is't.",
        "The quick brown fox jumps over the lazy dog 1234567890 times!?",
        "naïve café — Ærøskøbing, 東京, Привет, emoji 🙂🚀, tabs\tand   spaces\n\n\n",
        "",
        " leading space and trailing newline\n",
    ],
)
def test_builtin_tokenizer_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.eos_id for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_builtin_tokenizer_compresses_english(tok):
    text = "Now is the winter of our discontent made glorious summer by this sun of York"
    assert len(tok.encode(text)) < len(text.encode()) / 2.5


def test_special_token_text_in_documents_is_plain_text(tok):
    ids = tok.encode(f"before {EOT} after")
    assert tok.eos_id not in ids
    assert tok.decode(ids) == f"before {EOT} after"


def test_builtin_file_is_tiktoken_format(monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken caches even local files otherwise
    ranks = tiktoken.load.load_tiktoken_bpe(str(BUILTIN_TOKENIZER))
    assert ranks == read_tiktoken_ranks(BUILTIN_TOKENIZER)
    assert sorted(ranks.values()) == list(range(4095))
    assert all(ranks[bytes([b])] == b for b in range(256))  # single bytes first, in byte order


@pytest.fixture
def tiny_tiktoken(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"he", b"th", b"the", b" c", b" ca"):
        ranks[token] = len(ranks)  # 256 .. 260
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def test_tiktoken_file_tokenizer(tiny_tiktoken):
    tok = load_tokenizer(str(tiny_tiktoken))
    assert tok.eos_id == 261 and tok.get_vocab_size() == 262  # EOS id = number of ranks
    # "the": pairs th(257), he(256) -> he first -> t|he -> the(258).
    # " cat" (one GPT-2 piece): " c"(259) -> " ca"(260) -> " ca"|t.
    assert tok.encode("the cat") == [258, 260, ord("t")]
    # "then" -> t|he|n -> the|n ; "\n" is its own piece; "ca" without the space has no merge.
    assert tok.encode("then\nca", add_eos=True) == [258, ord("n"), ord("\n"), ord("c"), ord("a"), 261]
    assert tok.decode([258, 260, ord("t")]) == "the cat"
    # The GPT-2 regex keeps "'s" apart: "he's" -> he|'|s, not h|e'...
    assert tok.encode("he's") == [256, ord("'"), ord("s")]


def test_build_tiktoken_tokenizer_from_job_config(tiny_tiktoken, tok):
    jc = JobConfig()
    assert jc.model.tokenizer_path is None
    assert build_tiktoken_tokenizer(jc).encode("Hamlet") == tok.encode("Hamlet")
    jc.model.tokenizer_path = str(tiny_tiktoken)
    assert build_tiktoken_tokenizer(jc).get_vocab_size() == 262


@pytest.mark.parametrize("path", ["missing_gpt2.tiktoken", "/no/such/dir/vocab"])
def test_missing_tokenizer_file_names_key(path):
    jc = JobConfig()
    jc.model.tokenizer_path = path
    with pytest.raises(FileNotFoundError, match=r"model\.tokenizer_path") as e:
        build_tiktoken_tokenizer(jc)
    assert path in str(e.value)


def test_unknown_encoding_name_suggests_a_file():
    with pytest.raises(RuntimeError, match=r"(?s)no_such_encoding.*--model\.tokenizer_path"):
        load_tokenizer("no_such_encoding")


def test_padded_vocab_size():
    assert padded_vocab_size(50257) == 51200
    assert padded_vocab_size(4096) == 4096
    assert padded_vocab_size(4097) == 5120
    assert padded_vocab_size(100277, multiple=128) == 100352


# ---------------------------------------------------------------- built-in corpus


def test_builtin_corpus(corpus):
    assert BUILTIN_CORPUS.stat().st_size < 700_000
    train = [d for d in corpus if d["split"] == "train"]
    val = [d for d in corpus if d["split"] == "validation"]
    assert len(train) + len(val) == len(corpus) and 250 <= len(corpus) <= 500
    assert len(val) == len(corpus) // 10  # every 10th document
    assert len({d["source"] for d in corpus}) == 10
    assert len({d["text"] for d in corpus}) == len(corpus)
    text = "\n".join(d["text"] for d in corpus)
    assert "To be, or not to be" in text
    assert "Gutenberg" not in text and "SMALL PRINT" not in text


@pytest.mark.parametrize("section,split", [("training", "train"), ("validation", "validation")])
def test_builtin_sources_read_their_split(corpus, section, split):
    _, source = resolve_source("shakespeare", None, section)
    assert [d["text"] for d in source()] == [d["text"] for d in corpus if d["split"] == split]
    _, source = resolve_source("shakespeare_validation", None, section)
    assert [d["text"] for d in source()] == [d["text"] for d in corpus if d["split"] == "validation"]


def test_txt_and_directory_sources(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.txt").write_text("third doc\nline two\n\n\n\nfourth doc\n")
    (tmp_path / "a.txt").write_text("\nfirst doc\n  \nsecond doc")
    write_jsonl(tmp_path / "c.jsonl", ["fifth doc"])
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "sixth doc", "meta": 1}) + "\n")
    (tmp_path / "notes.md").write_text("ignored")
    _, source = resolve_source("anything", str(tmp_path), "training")
    texts = [d["text"] for d in source()]
    assert texts == ["first doc", "second doc", "third doc\nline two", "fourth doc", "fifth doc", "sixth doc"]
    _, source = resolve_source("ignored", str(tmp_path / "a.txt"), "training")
    assert [d["text"] for d in source()] == ["first doc", "second doc"]


# ---------------------------------------------------------------- packing


def test_packing_matches_hand_built_stream(tok, tmp_path):
    texts = [f"Document {i}: " + "word " * (3 + 7 * i) for i in range(6)]
    _, source = resolve_source("x", write_jsonl(tmp_path / "d.jsonl", texts), "training")
    L = 16
    stream = packed_stream(tok, texts)
    samples = list(PackedTextDataset(source, tok, seq_len=L, infinite=False))
    assert len(samples) == (len(stream) - 1) // L
    for k, (x, y) in enumerate(samples):
        assert x.keys() == {"input"} and x["input"].dtype == torch.long
        assert x["input"].tolist() == stream[k * L : k * L + L]
        assert y.tolist() == stream[k * L + 1 : k * L + L + 1]


def test_packing_loops_over_epochs(tok, tmp_path):
    texts = ["one two three", "four five", "six"]
    _, source = resolve_source("x", write_jsonl(tmp_path / "d.jsonl", texts), "training")
    L = 5
    stream = packed_stream(tok, texts) * 10
    ds = iter(PackedTextDataset(source, tok, seq_len=L, infinite=True))
    for k in range(3 * len(stream) // 10 // L + 2):  # about three epochs
        x, y = next(ds)
        assert x["input"].tolist() == stream[k * L : k * L + L]
        assert y.tolist() == stream[k * L + 1 : k * L + L + 1]


def test_dataloader_batches_builtin_corpus(tok, corpus):
    L, B = 64, 4
    batches = take(build_dataloader(1, 0, tok, job_config(seq_len=L, batch=B)), 3)
    stream = packed_stream(tok, [d["text"] for d in corpus if d["split"] == "train"])
    for b, (x, y) in enumerate(batches):
        assert x["input"].shape == y.shape == (B, L)
        for r in range(B):
            k = b * B + r
            assert x["input"][r].tolist() == stream[k * L : k * L + L]
            assert y[r].tolist() == stream[k * L + 1 : k * L + L + 1]


def test_validation_loader_is_one_repeatable_pass(tok, corpus):
    L, B = 128, 8
    jc = job_config("validation", seq_len=L, batch=B)
    # Called the way torchtitan's Validator calls build_text_validation_dataloader.
    loader = build_validation_dataloader(job_config=jc, dp_world_size=1, dp_rank=0, tokenizer=tok, infinite=False)
    stream = packed_stream(tok, [d["text"] for d in corpus if d["split"] == "validation"])
    first, second = list(loader), list(loader)
    assert sum(y.shape[0] for _, y in first) == (len(stream) - 1) // L
    assert first[0][0]["input"][0].tolist() == stream[:L]
    assert_same_batches(first, second)  # each validation run sees the same data


def test_validation_runs_that_stop_early_restart(tok):
    # validation.steps != -1: Validator builds an infinite loader and breaks after `steps`.
    jc = job_config("validation", seq_len=128, batch=4)
    loader = build_validation_dataloader(1, 0, tok, jc, infinite=True)
    first = take(loader, 3)
    assert_same_batches(take(loader, 3), first)
    # The training loader, by contrast, continues where it stopped.
    train = build_dataloader(1, 0, tok, job_config(seq_len=128, batch=4))
    a, b = take(train, 1), take(train, 1)
    assert not torch.equal(a[0][1], b[0][1])


def test_return_source_labels(tok, corpus):
    L, B = 512, 4
    train = [d for d in corpus if d["split"] == "train"]
    # Source label of every token of the packed stream.
    labels = [d["source"] for d in train for _ in range(len(tok.encode(d["text"])) + 1)]
    loader = build_dataloader(1, 0, tok, job_config(seq_len=L, batch=B), return_source=True)
    batches = take(loader, 3)
    for b, (x, _) in enumerate(batches):
        assert x["source"] == [labels[(b * B + r) * L] for r in range(B)]
    assert len({s for x, _ in batches for s in x["source"]}) > 1


# ---------------------------------------------------------------- sharding


def decoded_documents(tok, dataset):
    """Recover the documents a dataset read: with seq_len 1 every token is yielded."""
    ids = []
    for x, y in dataset:
        ids += x["input"].tolist()
    ids.append(y.item())
    docs, cur = [], []
    for i in ids:
        if i == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert cur == []
    return docs


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_read_disjoint_documents_covering_the_epoch(tok, tmp_path, world):
    texts = [f"doc {i} " + "la " * (i % 4) for i in range(11)]
    _, source = resolve_source("x", write_jsonl(tmp_path / "d.jsonl", texts), "training")
    per_rank = [
        decoded_documents(tok, PackedTextDataset(source, tok, 1, rank, world, infinite=False))
        for rank in range(world)
    ]
    for rank, docs in enumerate(per_rank):
        assert docs == texts[rank::world]  # document i -> rank i % world
    assert sorted(sum(per_rank, [])) == sorted(texts)


def test_two_ranks_of_builtin_corpus(tok, corpus):
    L, B = 32, 2
    train = [d["text"] for d in corpus if d["split"] == "train"]
    for rank in range(2):
        x, y = next(iter(build_dataloader(2, rank, tok, job_config(seq_len=L, batch=B))))
        stream = packed_stream(tok, train[rank::2])
        assert x["input"].reshape(-1).tolist() == stream[: B * L]
        assert y[1].tolist() == stream[L + 1 : 2 * L + 1]


def test_dataloader_workers_split_a_ranks_documents(tok, tmp_path):
    texts = [f"doc {i} " + "ho " * i for i in range(7)]
    jc = job_config("validation", seq_len=1, batch=1, path=write_jsonl(tmp_path / "d.jsonl", texts), workers=2)
    got = sorted(x["input"].item() for x, _ in build_validation_dataloader(1, 0, tok, jc))
    # Worker w packs documents w, w + 2, ...; with seq_len 1 all but its last token are inputs.
    expected = sorted(t for w in range(2) for t in packed_stream(tok, texts[w::2])[:-1])
    assert got == expected


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_builtin(tok, workers):
    jc = job_config(seq_len=64, batch=4, workers=workers)
    loader = build_dataloader(1, 0, tok, jc)
    it = iter(loader)
    for _ in range(5):
        next(it)
    state = pickle.loads(pickle.dumps(loader.state_dict()))  # as a checkpoint would store it
    expected = [next(it) for _ in range(7)]

    resumed = build_dataloader(1, 0, tok, jc)
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, 7), expected)


@pytest.mark.parametrize("workers", [0, 1])
def test_exact_resume_across_epochs_and_ranks(tok, tmp_path, workers):
    texts = [f"short document number {i} " * (1 + i % 3) for i in range(9)]
    jc = job_config(seq_len=8, batch=3, path=write_jsonl(tmp_path / "d.jsonl", texts), workers=workers)
    for rank in range(2):
        loader = build_dataloader(2, rank, tok, jc)
        it = iter(loader)
        for _ in range(4):
            next(it)
        state = loader.state_dict()
        expected = [next(it) for _ in range(12)]  # crosses several epochs of this rank's docs
        resumed = build_dataloader(2, rank, tok, jc)
        resumed.load_state_dict(state)
        assert_same_batches(take(resumed, 12), expected)


def test_a_state_in_the_checkpoint_format_resumes(tok, tmp_path):
    """Existing checkpoints hold these keys: a state written by hand in that format resumes at its
    document, its leftover tokens first."""
    texts = [f"doc {i} " + "word " * i for i in range(6)]
    _, source = resolve_source("x", write_jsonl(tmp_path / "d.jsonl", texts), "training")
    ds = PackedTextDataset(source, tok, seq_len=4)
    next(iter(ds))
    assert set(ds.state_dict()) == {"doc_idx", "epoch", "token_buffer"}
    labelled = PackedTextDataset(source, tok, seq_len=4, return_source=True)
    assert set(labelled.state_dict()) == {"doc_idx", "epoch", "token_buffer", "segments"}
    leftover = [7, 8, 9]
    ds = PackedTextDataset(source, tok, seq_len=4)
    ds.load_state_dict({"doc_idx": 3, "epoch": 1, "token_buffer": leftover})
    stream = leftover + packed_stream(tok, texts[3:])
    x, y = next(iter(ds))
    assert x["input"].tolist() == stream[:4] and y.tolist() == stream[1:5]


def test_resume_of_validation_pass(tok):
    jc = job_config("validation", seq_len=128, batch=4)
    loader = build_validation_dataloader(1, 0, tok, jc)
    it = iter(loader)
    next(it), next(it)
    state = loader.state_dict()
    rest = list(it)
    resumed = build_validation_dataloader(1, 0, tok, jc)
    resumed.load_state_dict(state)
    assert_same_batches(list(resumed), rest)


# ---------------------------------------------------------------- bad inputs


def test_missing_dataset_path(tok, tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=r"training\.dataset_path") as e:
        build_dataloader(1, 0, tok, job_config(path=missing))
    assert missing in str(e.value)
    with pytest.raises(FileNotFoundError, match=r"validation\.dataset_path"):
        build_validation_dataloader(1, 0, tok, job_config("validation", path=missing))


def test_empty_sources(tok, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.txt").write_text("\n \n\n")
    (tmp_path / "emptydir").mkdir()
    for name in ("empty.jsonl", "blank.txt", "emptydir"):
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=r"training\.dataset_path") as e:
            build_dataloader(1, 0, tok, job_config(path=path))
        assert path in str(e.value)


def test_jsonl_without_text_field(tok, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"content": "no text key"}) + "\n")
    with pytest.raises(ValueError, match=r"training\.dataset_path.*line 1.*'text'"):
        build_dataloader(1, 0, tok, job_config(path=str(path)))
    # A bad line further down fails when it is reached, still naming key, file and line.
    path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "bad"}) + "\n")
    loader = build_dataloader(1, 0, tok, job_config(path=str(path)))
    with pytest.raises(ValueError, match=r"training\.dataset_path.*bad\.jsonl.*line 2"):
        next(iter(loader))


def test_unknown_dataset_name(tok):
    with pytest.raises(ValueError, match=r"training\.dataset = 'c4_test'.*shakespeare"):
        build_dataloader(1, 0, tok, job_config(dataset="c4_test"))
    with pytest.raises(ValueError, match=r"validation\.dataset = 'c4_validation'"):
        build_validation_dataloader(1, 0, tok, job_config("validation", dataset="c4_validation"))


def test_too_many_ranks_for_documents(tok, tmp_path):
    jc = job_config(seq_len=4, path=write_jsonl(tmp_path / "d.jsonl", ["only one document"]))
    with pytest.raises(ValueError, match="no documents for dp rank 1"):
        next(iter(build_dataloader(2, 1, tok, jc)))
