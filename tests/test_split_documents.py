"""scripts/split_documents.py: the paper's 969/30/1 document split, per file, contiguous, .zst too."""

import json
import subprocess
import sys

import pytest
import zstandard

from tests.runs import REPO


@pytest.mark.parametrize("num_docs, expected", [(2000, [1938, 60, 2]), (1234, [1196, 37, 1])])
def test_split_is_megatrons_969_30_1_by_document(tmp_path, num_docs, expected):
    # Counts by hand: round(0.969 n), round(0.030 n), the rest.
    lines = "".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(num_docs))
    (tmp_path / "01.jsonl").write_text(lines)
    (tmp_path / "02.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    out = tmp_path / "split"
    proc = subprocess.run(
        [sys.executable, "scripts/split_documents.py", "--out", str(out),
         str(tmp_path / "01.jsonl"), str(tmp_path / "02.jsonl.zst")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stderr
    for name in ("01", "02"):
        texts = {s: [json.loads(x)["text"] for x in (out / s / f"{name}.jsonl").read_text().splitlines()]
                 for s in ("train", "valid", "test")}
        assert [len(texts[s]) for s in ("train", "valid", "test")] == expected
        assert texts["train"] + texts["valid"] + texts["test"] == [f"doc {i}" for i in range(num_docs)]


def test_existing_output_is_not_overwritten(tmp_path):
    (tmp_path / "01.jsonl").write_text('{"text": "a"}\n')
    (tmp_path / "out" / "train").mkdir(parents=True)
    (tmp_path / "out" / "train" / "01.jsonl").write_text("keep me")
    proc = subprocess.run(
        [sys.executable, "scripts/split_documents.py", "--out", str(tmp_path / "out"), str(tmp_path / "01.jsonl")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert proc.returncode != 0 and "already exists" in proc.stderr
    assert (tmp_path / "out" / "train" / "01.jsonl").read_text() == "keep me"
