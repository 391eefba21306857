"""Tests of the document sources: Hugging Face datasets (offline, on local files), parquet,
globs, .jsonl.zst, the configurable text and label fields, and the [data] TOML section."""

import json
import pickle

import pytest
import torch
from torchtitan.config import JobConfig

from remoe_recipe.data import build_dataloader, build_validation_dataloader, load_tokenizer, resolve_source
from remoe_recipe.data.config import Data
from remoe_recipe.data.dataset import PackedTextDataset


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin")


@pytest.fixture(autouse=True)
def hf_offline(monkeypatch, tmp_path_factory):
    """No Hub access here: Hugging Face offline mode, and a private datasets cache (outside tmp_path:
    datasets writes lock files there, which a test's data folder must not hold)."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_cache"))


def job_config(section="training", seq_len=16, batch=2, dataset="shakespeare", path=None, workers=0, **data):
    jc = JobConfig()
    jc.data = Data(**data)  # what remoe_recipe.config adds to torchtitan's JobConfig
    cfg = getattr(jc, section)
    cfg.dataset, cfg.dataset_path = dataset, path
    cfg.seq_len, cfg.local_batch_size = seq_len, batch
    cfg.dataloader.num_workers = workers
    return jc


def pile_rows(n, prefix="doc"):
    """Rows shaped like monology/pile-uncopyrighted: text + meta.pile_set_name."""
    sets = ["Pile-CC", "Github", "ArXiv", "PubMed Central"]
    return [
        {"text": f"{prefix} {i}: " + "the cat sat on the mat " * (1 + i % 5), "meta": {"pile_set_name": sets[i % 4]}}
        for i in range(n)
    ]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def packed(tok, texts):
    return [t for text in texts for t in tok.encode(text) + [tok.eos_id]]


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def same_batches(a, b):
    return len(a) == len(b) and all(
        torch.equal(xa["input"], xb["input"]) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b)
    )


# ---------------------------------------------------------------- Hugging Face


@pytest.fixture
def hf_dir(tmp_path):
    """A local dataset folder with a train and a validation split, as on the Hub."""
    d = tmp_path / "pile_like"
    train, val = pile_rows(13), pile_rows(5, prefix="held-out")
    write_jsonl(d / "train.jsonl", train)
    write_jsonl(d / "validation.jsonl", val)
    return d, train, val


@pytest.mark.parametrize("streaming", [True, False])
def test_hf_dataset_by_name(tok, hf_dir, streaming):
    d, train, val = hf_dir
    for section, rows in (("training", train), ("validation", val)):
        _, source = resolve_source(str(d), None, section, Data(streaming=streaming))
        docs = list(source())
        assert [doc["text"] for doc in docs] == [r["text"] for r in rows]
        assert [doc["source"] for doc in docs] == [r["meta"]["pile_set_name"] for r in rows]
        assert [doc["text"] for doc in source(start=3)] == [r["text"] for r in rows[3:]]
    # Through the loader: packed exactly like the hand-built stream of the train split.
    L = 8
    x, y = next(iter(build_dataloader(1, 0, tok, job_config(dataset=str(d), seq_len=L, batch=3, streaming=streaming))))
    stream = packed(tok, [r["text"] for r in train])
    assert x["input"].reshape(-1).tolist() == stream[: 3 * L]
    assert y[2].tolist() == stream[2 * L + 1 : 3 * L + 1]


def test_hf_json_builder_with_text_field_and_split(tok, tmp_path):
    rows = [{"content": f"body {i}", "domain": f"d{i % 2}"} for i in range(4)]
    write_jsonl(tmp_path / "hf" / "val.jsonl", rows)  # "val" is a validation split for datasets
    data = Data(text_field="content", label_field="domain", validation_split="validation")
    _, source = resolve_source(str(tmp_path / "hf"), None, "validation", data)
    assert [(d["text"], d["source"]) for d in source()] == [(r["content"], r["domain"]) for r in rows]
    with pytest.raises(ValueError, match=r"training\.dataset = .*split 'train'"):
        resolve_source(str(tmp_path / "hf"), None, "training", data)


def test_hf_save_to_disk_folder(tok, tmp_path):
    import datasets

    rows = pile_rows(6)
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": ds, "validation": ds.select([4, 5])}).save_to_disk(str(tmp_path / "dict"))
    _, source = resolve_source("x", str(tmp_path / "one"), "training")
    assert [d["text"] for d in source()] == [r["text"] for r in rows]
    assert [d["text"] for d in source(start=4)] == [r["text"] for r in rows[4:]]
    _, source = resolve_source("x", str(tmp_path / "dict"), "validation")
    assert [d["source"] for d in source()] == [r["meta"]["pile_set_name"] for r in rows[4:]]


@pytest.mark.parametrize("workers", [0, 2])
def test_hf_streaming_exact_resume(tok, hf_dir, workers):
    d, _, _ = hf_dir
    jc = job_config(dataset=str(d), seq_len=6, batch=2, workers=workers)
    loader = build_dataloader(1, 0, tok, jc)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = pickle.loads(pickle.dumps(loader.state_dict()))
    expected = [next(it) for _ in range(6)]
    resumed = build_dataloader(1, 0, tok, jc)
    resumed.load_state_dict(state)
    assert same_batches(take(resumed, 6), expected)


def test_hf_unknown_name_fails_fast_with_key(tok):
    with pytest.raises(ValueError, match=r"training\.dataset = 'no-such-org/no-such-dataset': could not open"):
        build_dataloader(1, 0, tok, job_config(dataset="no-such-org/no-such-dataset"))


def test_hf_missing_text_field(tok, hf_dir):
    d, _, _ = hf_dir
    with pytest.raises(ValueError, match=r"training\.dataset = .*no string field 'body' \(data\.text_field\)"):
        build_dataloader(1, 0, tok, job_config(dataset=str(d), text_field="body"))


# ---------------------------------------------------------------- local files


def test_parquet_source_with_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"body": f"parquet doc {i}", "meta": {"pile_set_name": f"set{i % 3}"}, "n": i} for i in range(7)]
    pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "a.parquet", row_group_size=2)
    pq.write_table(pa.Table.from_pylist(rows[4:]), tmp_path / "b.parquet")
    _, source = resolve_source("x", str(tmp_path), "training", Data(text_field="body"))
    assert [(d["text"], d["source"]) for d in source()] == [(r["body"], r["meta"]["pile_set_name"]) for r in rows]
    for start in (2, 4, 5, 7):  # within a file, at a file boundary, past the first file, the end
        assert [d["text"] for d in source(start=start)] == [r["body"] for r in rows[start:]]
    with pytest.raises(ValueError, match=r"training\.dataset_path = .*no column 'text'.*\['body', 'meta', 'n'\]"):
        resolve_source("x", str(tmp_path / "a.parquet"), "training")


def test_txt_blocks_across_line_end_styles(tmp_path):
    # Windows (\r\n) and old Mac (\r) line ends read like \n ones; whitespace-only lines separate blocks.
    (tmp_path / "w.txt").write_bytes(b"first\r\nblock\r\n \t\r\nsecond\rblock\r\r\r\nthird  \n")
    _, source = resolve_source("x", str(tmp_path / "w.txt"), "training")
    assert [d["text"] for d in source()] == ["first\nblock", "second\nblock", "third  "]
    assert [d["text"] for d in source(start=2)] == ["third  "]


def test_glob_source(tmp_path):
    write_jsonl(tmp_path / "b" / "2.jsonl", [{"text": "second"}])
    write_jsonl(tmp_path / "a" / "1.jsonl", [{"text": "first"}])
    write_jsonl(tmp_path / "a" / "skip.json", [{"text": "not matched"}])
    (tmp_path / "c.txt").write_text("third")
    _, source = resolve_source("x", str(tmp_path / "**" / "*.jsonl"), "training")
    assert [d["text"] for d in source()] == ["first", "second"]
    assert [d["source"] for d in source()] == ["1.jsonl", "2.jsonl"]  # no label field: file name
    with pytest.raises(FileNotFoundError, match=r"training\.dataset_path = .*nothing\*.*matches no"):
        resolve_source("x", str(tmp_path / "nothing*.jsonl"), "training")


def test_jsonl_zst(tmp_path):
    import zstandard  # a dependency of the recipe: no skip
    rows = pile_rows(3)
    raw = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (tmp_path / "00.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    expected = [(r["text"], r["meta"]["pile_set_name"]) for r in rows]
    _, source = resolve_source("x", str(tmp_path), "training")
    assert [(d["text"], d["source"]) for d in source()] == expected
    # The same folder as a Hugging Face dataset (how monology/pile-uncopyrighted is stored).
    _, source = resolve_source(str(tmp_path), None, "training")
    assert [(d["text"], d["source"]) for d in source()] == expected


def test_label_field_and_sample_labels(tok, tmp_path):
    rows = [{"text": "alpha " * (3 + i), "domain": f"dom{i % 3}", "source": "ignored"} for i in range(9)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    L, B = 4, 3
    jc = job_config(path=path, seq_len=L, batch=B, label_field="domain")
    labels = [r["domain"] for r in rows for _ in range(len(tok.encode(r["text"])) + 1)]  # one per token
    batches = take(build_dataloader(1, 0, tok, jc, return_source=True), 4)
    for b, (x, _) in enumerate(batches):
        assert x["source"] == [labels[(b * B + r) * L] for r in range(B)]
    # Without the configured field the document's own "source" field labels it.
    _, source = resolve_source("x", path, "training", Data(label_field="nope"))
    assert {d["source"] for d in source()} == {"ignored"}


def test_missing_text_field_names_data_key(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "x"}])
    with pytest.raises(ValueError, match=r"training\.dataset_path = .*line 1.*'text' \(data\.text_field\).*\['content'\]"):
        build_dataloader(1, 0, tok, job_config(path=path))


def test_token_id_beyond_vocab_is_an_error(tok, tmp_path):
    # A vocabulary one short of the tokenizer's: the EOS (the last id, 4095) is out of range.
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "To be"}, {"text": "or not to be"}])
    _, source = resolve_source("x", path, "training")
    ds = PackedTextDataset(source, tok, seq_len=2, vocab_size=4095, name="training data d.jsonl")
    with pytest.raises(ValueError, match=r"training data d\.jsonl: document 0 has token id 4095 >= the vocabulary size 4095"):
        next(iter(ds))


def test_finite_pass_without_a_sample_is_an_error(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "tiny"}])
    jc = job_config("validation", path=path, seq_len=64)
    with pytest.raises(ValueError, match="gave no sample of 65 tokens"):
        list(build_validation_dataloader(1, 0, tok, jc))


# ---------------------------------------------------------------- [data] TOML section


def test_data_section_in_toml(tmp_path):
    from remoe_recipe.config import ConfigError
    from remoe_recipe.preflight import load_config

    toml = tmp_path / "c.toml"
    toml.write_text(
        '[model]\nname = "remoe"\nflavor = "debugmodel"\n'
        '[training]\ndataset = "monology/pile-uncopyrighted"\n'
        '[data]\ntext_field = "content"\nstreaming = false\nmix = ["0.7 ./a", "0.3 hf:allenai/c4"]\n'
    )
    # check_data=False: the mix's paths need not exist to test how the section is parsed.
    cfg = load_config(["--job.config_file", str(toml), "--data.label_field", "domain"], check_data=False)
    assert cfg.data == Data(text_field="content", label_field="domain", streaming=False, mix=["0.7 ./a", "0.3 hf:allenai/c4"])
    assert load_config(["--job.config_file", str(toml), "--data.mix", "1 x,2 y"]).data.mix == ["1 x", "2 y"]
    toml.write_text('[model]\nname = "remoe"\nflavor = "debugmodel"\n[data]\nstreaming = "yes"\n')
    with pytest.raises(ConfigError, match=r"data\.streaming = 'yes'"):
        load_config(["--job.config_file", str(toml)])
