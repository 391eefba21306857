"""Data errors name the file and line (or the key) in one line; bad records can be skipped with a count."""

import gzip
import json
import logging
import re

import pytest

from remoe_recipe.config import ConfigError
from remoe_recipe.data.config import Data
from remoe_recipe.data.dataset import PackedTextDataset
from remoe_recipe.data.documents import DataError
from remoe_recipe.data.files import files_documents, jsonl_documents
from remoe_recipe.data.tokenizer import load_tokenizer
from remoe_recipe.preflight import load_config
from tests.runs import CONFIGS, run_training

KEY = "training.dataset_path"


def _corpus(tmp_path, bad_line: int, n: int = 40, name="docs.jsonl", opener=open):
    """n JSON lines; line `bad_line` holds a byte that is not UTF-8 (0xff)."""
    lines = [json.dumps({"text": f"Document number {i}: " + "to be or not to be " * 8}).encode() for i in range(1, n + 1)]
    lines[bad_line - 1] = b'{"text": "caf\xff au lait"}'
    path = tmp_path / name
    with opener(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("name, opener", [("docs.jsonl", open), ("docs.jsonl.gz", gzip.open)])
def test_undecodable_byte_names_file_line_and_byte(tmp_path, name, opener):
    path = _corpus(tmp_path, 12, name=name, opener=opener)
    docs = jsonl_documents(path, Data(), KEY)
    good = [next(docs) for _ in range(11)]
    assert good[-1]["text"].startswith("Document number 11:")
    with pytest.raises(DataError) as info:
        next(docs)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "line 12 is not UTF-8 text (byte 0xff at column 14)" in message
    assert "data.skip_bad_records" in message


def test_skipping_bad_records_counts_them_and_keeps_indices(tmp_path, caplog):
    path = _corpus(tmp_path, 12)
    with open(path, "ab") as f:
        f.write(b"not json\n" + json.dumps({"body": "no text field"}).encode() + b"\n")
    caplog.set_level(logging.WARNING)
    docs = list(jsonl_documents(path, Data(skip_bad_records=True), KEY))
    # 40 lines, one not UTF-8, then one not JSON and one without "text": 39 documents.
    assert len(docs) == 39 and docs[11]["text"].startswith("Document number 13:")
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 3
    assert "line 12 is not UTF-8" in skipped[0] and "(1 bad record(s)" in skipped[0]
    assert "line 41 is not JSON" in skipped[1] and "(2 bad record(s)" in skipped[1]
    assert "line 42 has no string field 'text'" in skipped[2] and "(3 bad record(s)" in skipped[2]
    # A resume from document 20 reads the same documents as the uninterrupted pass.
    again = list(files_documents([path], Data(skip_bad_records=True), KEY, start=20))
    assert again == docs[20:]


def test_binary_file_is_named_not_a_bare_unicode_error(tmp_path):
    path = tmp_path / "image.txt"
    path.write_bytes(bytes(range(256)) * 4)
    # Bytes 10 (\n) and 13 (a lone \r) end lines, as in datasets' text reader (Python's universal
    # newlines), so byte 0x80 (offset 128) is column 128 - 14 + 1 = 115 of line 3.
    with pytest.raises(DataError, match=r"image\.txt'?: line 3 is not UTF-8 text \(byte 0x80 at column 115\)"):
        list(files_documents([path], Data(), KEY))


def _zstd(raw: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(raw)


@pytest.mark.parametrize("name, compress", [("d.jsonl", bytes), ("d.jsonl.gz", gzip.compress), ("d.jsonl.zst", _zstd)])
def test_bad_line_after_many_good_ones_is_skipped_in_place(tmp_path, monkeypatch, caplog, name, compress):
    """datasets' text reader stops at a byte that is not UTF-8, after it has delivered the lines before
    it; the file is then read on from the next line, so each good document comes once, in order. Line
    numbers count a lone \r as a line end (as that reader does), before and after the switch."""
    from remoe_recipe.data import files

    # Small chunks and batches: the reader delivers lines before it reaches the bad one.
    monkeypatch.setattr(files, "TEXT_CHUNK_CHARS", 512)
    monkeypatch.setattr(files, "BATCH_ROWS", 4)
    resumed_after = []
    scan = files.scan_lines
    monkeypatch.setattr(files, "scan_lines", lambda *a, after: resumed_after.append(after) or scan(*a, after=after))
    texts = [f"doc {i} " + "to be or not to be " * 20 for i in range(60)]
    lines = [json.dumps({"text": t}).encode() for t in texts]
    lines[3] += b"\r"  # a CRLF line end
    lines[5] += b"\r" + json.dumps({"text": "extra"}).encode()  # a lone \r: "extra" is line 7
    lines[49] = b'{"text": "caf\xe9"}'  # Latin-1, not UTF-8: line 51
    lines[55] = b"not json"  # line 57
    (tmp_path / name).write_bytes(compress(b"\n".join(lines) + b"\n"))
    expected = texts[:6] + ["extra"] + texts[6:49] + texts[50:55] + texts[56:]

    caplog.set_level(logging.WARNING)
    docs = list(files_documents([tmp_path / name], Data(skip_bad_records=True), KEY))
    assert [d["text"] for d in docs] == expected
    assert resumed_after and resumed_after[0] > 7  # the reader had delivered lines (past the \r) first
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2
    assert "line 51 is not UTF-8 text (byte 0xe9 at column 14)" in skipped[0]
    assert "line 57 is not JSON" in skipped[1] and "(2 bad record(s)" in skipped[1]
    # Resuming at document 50 (after the bad line) gives the same documents.
    assert list(files_documents([tmp_path / name], Data(skip_bad_records=True), KEY, start=50)) == docs[50:]
    # Without skipping: the documents before it, then one line naming it.
    docs = files_documents([tmp_path / name], Data(), KEY)
    assert [next(docs)["text"] for _ in range(50)] == expected[:50]
    with pytest.raises(DataError, match=rf"{name}'?: line 51 is not UTF-8 text \(byte 0xe9 at column 14\)"):
        next(docs)


@pytest.mark.parametrize("name, compress", [("d.jsonl.gz", gzip.compress), ("d.jsonl.zst", _zstd)])
def test_corrupt_compressed_file_is_named(tmp_path, name, compress):
    raw = compress(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(2000)))
    (tmp_path / name).write_bytes(raw[:4] + b"garbage" + raw[11:])  # the magic number, then no valid frame
    with pytest.raises(DataError, match=rf"{name}'?: cannot be read \(\w+: "):
        list(files_documents([tmp_path / name], Data(), KEY))


def test_training_run_stops_at_a_bad_line_in_one_line(tmp_path):
    path = _corpus(tmp_path, 12)
    proc = run_training(
        "debug_remoe.toml", tmp_path / "run", "--training.dataset_path", str(path), "--training.steps", "20",
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    [error] = [line for line in out.splitlines() if " - ERROR - " in line]
    assert error.split(" - ERROR - ")[1].startswith(f"data error: {KEY} = '{path}': line 12 is not UTF-8")
    assert "Traceback" not in out


def test_malformed_tiktoken_file_names_path_and_line(tmp_path):
    path = tmp_path / "vocab.tiktoken"
    path.write_text("IQ== 0\nIg== 1\nthis is not a ranks line\n")
    with pytest.raises(ValueError, match=r"vocab\.tiktoken'?: line 3 is not 'base64-token rank'"):
        load_tokenizer(str(path))
    argv = ["--job.config_file", str(CONFIGS / "debug_remoe.toml"), "--model.tokenizer_path", str(path)]
    with pytest.raises(ConfigError, match=r"model\.tokenizer_path = .*vocab\.tiktoken'?: line 3"):
        load_config(argv)


@pytest.mark.parametrize("steps", ["0", "-5"])
def test_training_steps_must_be_positive(steps):
    argv = ["--job.config_file", str(CONFIGS / "debug_remoe.toml"), "--training.steps", steps]
    with pytest.raises(ConfigError, match=rf"training\.steps = {steps}: expected an integer >= 1"):
        load_config(argv)


def test_short_corpus_warns_once_instead_of_an_epoch_line_per_step(caplog):
    tokenizer = load_tokenizer("builtin")
    source = lambda start=0: iter([{"text": "To be, or not to be.", "source": "x"}][start:])  # noqa: E731
    ds = PackedTextDataset(source, tokenizer, seq_len=16, name="training data tiny")
    caplog.set_level(logging.INFO)
    it = iter(ds)
    samples = [next(it) for _ in range(20)]
    assert len(samples) == 20
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    n_tokens = len(tokenizer.encode("To be, or not to be.", add_eos=True))
    assert re.search(rf"gives only {n_tokens // 17} samples of 17 tokens \(1 documents\)", warnings[0])
    assert not [r for r in caplog.records if "starts epoch" in r.getMessage()]


def test_a_dataset_that_is_not_one_is_one_line_from_the_entry_point(tmp_path, capsys):
    """Refused by the config checks, before any process group: one line, exit 2. (A bad record found
    while training, after the process group, is one line too: test_training_run_stops_at_a_bad_line...)"""
    from remoe_recipe import train

    argv = ["--job.config_file", str(CONFIGS / "debug_remoe.toml"), "--job.dump_folder", str(tmp_path),
            "--training.dataset", "c4_test", "--checkpoint.no-enable", "--validation.no-enable"]
    with pytest.raises(SystemExit) as info:
        train.main(argv)
    assert info.value.code == 2
    out = capsys.readouterr()
    [error] = [line.split(" - ERROR - ", 1)[1] for line in out.out.splitlines() if " - ERROR - " in line]
    assert error.startswith("config error: training.dataset = 'c4_test': not a dataset of this recipe")
    assert "Traceback" not in out.out + out.err
