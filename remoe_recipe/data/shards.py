"""Token shards: a corpus tokenized once, stored as flat binary token files plus a JSON index.

Layout of a shard folder (written by `ShardWriter`, e.g. through scripts/prepare_shards.py):

    index.json          format, tokenizer (name, vocab size, EOS id, fingerprint), dtype,
                        token/document counts, label names, and per shard: file names,
                        token/document counts, byte size, sha256
    tokens_00000.bin    the token ids, little-endian uint16 (vocab <= 65536) or uint32; every
                        document followed by one EOS, documents back to back, never split
    docs_00000.npy      uint64 end offset (exclusive, within the shard) of every document
    labels_00000.npy    uint32 id (into index["labels"]) of every document's source/domain label

`TokenShards` reads the concatenation of all shards as one token stream by memory map, with
random access; it checks the index against the files (missing file, byte size, last token EOS)
and against the tokenizer when opened, so a stale or foreign folder fails at start-up.
"""

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from remoe_recipe.data.documents import DataError

FORMAT = "remoe-token-shards"
VERSION = 1
INDEX = "index.json"
# Text whose encoding identifies a BPE: same name and size but different merges differ here.
_PROBE = (
    "The quick brown fox jumps over the lazy dog. To be, or not to be: that is the question.\n"
    "def f(x):\n    return x ** 2  # 1234567890 naïve café Ærøskøbing 東京 Привет 🙂\n"
)


def tokenizer_fingerprint(tokenizer) -> str:
    ids = tokenizer.encode(_PROBE)
    blob = json.dumps([tokenizer.get_vocab_size(), tokenizer.eos_id, ids]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_shard_dir(path: str | os.PathLike | None) -> bool:
    return bool(path) and (Path(os.path.expanduser(str(path))) / INDEX).is_file()


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Appends tokenized documents to shard files; `close()` writes index.json last, so a folder
    without an index is an unfinished one."""

    def __init__(self, out_dir, tokenizer, tokenizer_name: str, shard_tokens: int = 1 << 28,
                 source: str = "", overwrite: bool = False):
        self.out = Path(out_dir)
        if (self.out / INDEX).exists() and not overwrite:
            raise FileExistsError(f"{self.out / INDEX} exists; remove it or pass --overwrite")
        self.out.mkdir(parents=True, exist_ok=True)
        self.vocab_size = tokenizer.get_vocab_size()
        self.eos_id = tokenizer.eos_id
        self.dtype = token_dtype(self.vocab_size)
        self.tokenizer = {
            "name": tokenizer_name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "fingerprint": tokenizer_fingerprint(tokenizer),
        }
        self.shard_tokens = shard_tokens
        self.source = source
        self.labels: dict[str, int] = {}
        self.shards: list[dict] = []
        self._file = None

    def _open_shard(self) -> None:
        i = len(self.shards)
        self._names = (f"tokens_{i:05d}.bin", f"docs_{i:05d}.npy", f"labels_{i:05d}.npy")
        self._file = open(self.out / self._names[0], "wb")
        self._hash = hashlib.sha256()
        self._ends: list[int] = []
        self._doc_labels: list[int] = []
        self._n = 0

    def add(self, tokens, lengths, labels) -> None:
        """Documents given as one concatenated token array (each document already ending in
        EOS), their lengths and their labels."""
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise DataError(f"token id out of [0, {self.vocab_size}) while writing {self.out}")
        pos = 0
        for length, label in zip(map(int, lengths), labels):
            if self._file is None:
                self._open_shard()
            doc = tokens[pos : pos + length].astype(self.dtype)
            pos += length
            data = doc.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._n += length
            self._ends.append(self._n)
            self._doc_labels.append(self.labels.setdefault(str(label), len(self.labels)))
            if self._n >= self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.close()
        self._file = None
        np.save(self.out / self._names[1], np.asarray(self._ends, dtype=np.uint64))
        np.save(self.out / self._names[2], np.asarray(self._doc_labels, dtype=np.uint32))
        self.shards.append({
            "tokens": self._names[0], "docs": self._names[1], "labels": self._names[2],
            "num_tokens": self._n, "num_documents": len(self._ends),
            "bytes": self._n * self.dtype.itemsize, "sha256": self._hash.hexdigest(),
        })

    def close(self) -> dict:
        if self._file is not None:
            self._close_shard()
        index = {
            "format": FORMAT,
            "version": VERSION,
            "tokenizer": self.tokenizer,
            "dtype": self.dtype.name,
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "num_documents": sum(s["num_documents"] for s in self.shards),
            "labels": sorted(self.labels, key=self.labels.get),
            "source": self.source,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "shards": self.shards,
        }
        tmp = self.out / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(self.out / INDEX)
        return index


class TokenShards:
    """The token stream of a shard folder, memory-mapped, with random access.

    `key` is the config key that named the folder (for error messages); `tokenizer` (optional)
    must be the one the shards were written with.
    """

    def __init__(self, path, key: str = "dataset_path", tokenizer=None, verify: bool = False):
        self.path = Path(os.path.expanduser(str(path)))
        self.key = key
        self.where = f"{key} = {str(path)!r}"
        index_file = self.path / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.where}: no {INDEX} (not a token-shard folder, or unfinished)")
        try:
            self.index = index = json.loads(index_file.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{self.where}: {INDEX} is not valid JSON ({e})") from e
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise DataError(
                f"{self.where}: {INDEX} is not a {FORMAT} v{VERSION} index "
                f"(format {index.get('format')!r}, version {index.get('version')!r})"
            )
        if index.get("dtype") not in ("uint16", "uint32"):
            raise DataError(f"{self.where}: dtype {index.get('dtype')!r} is not uint16 or uint32")
        self.dtype = np.dtype(index["dtype"]).newbyteorder("<")
        tok = index["tokenizer"]
        self.vocab_size, self.eos_id = tok["vocab_size"], tok["eos_id"]
        if tokenizer is not None:
            self._check_tokenizer(tokenizer, tok)
        self.labels: list[str] = index.get("labels", [])
        self.shards = index["shards"]
        for s in self.shards:
            self._check_shard(s, verify)
        counts = [s["num_tokens"] for s in self.shards]
        if sum(counts) != index["num_tokens"]:
            raise DataError(
                f"{self.where}: shards hold {sum(counts)} tokens, {INDEX} says {index['num_tokens']}"
            )
        self.num_tokens = int(sum(counts))
        if self.num_tokens < 2:
            raise DataError(f"{self.where}: {self.num_tokens} tokens (empty source)")
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._tokens: dict[int, np.memmap] = {}
        self._docs: dict[int, np.ndarray] = {}
        self._doc_labels: dict[int, np.ndarray] = {}

    def _check_tokenizer(self, tokenizer, tok: dict) -> None:
        have = (tokenizer.get_vocab_size(), tokenizer.eos_id, tokenizer_fingerprint(tokenizer))
        want = (tok["vocab_size"], tok["eos_id"], tok.get("fingerprint"))
        if have != want:
            raise DataError(
                f"{self.where}: the shards were tokenized with {tok.get('name')!r} (vocab "
                f"{want[0]}, EOS {want[1]}, fingerprint {want[2]}), but model.tokenizer_path "
                f"gives vocab {have[0]}, EOS {have[1]}, fingerprint {have[2]}"
            )

    def _check_shard(self, s: dict, verify: bool) -> None:
        f = self.path / s["tokens"]
        if not f.is_file():
            raise FileNotFoundError(f"{self.where}: shard file {s['tokens']} is missing")
        size = f.stat().st_size
        if size != s["num_tokens"] * self.dtype.itemsize or size != s.get("bytes", size):
            raise DataError(
                f"{self.where}: shard {s['tokens']} has {size} bytes, the index says "
                f"{s['num_tokens']} {self.dtype.name} tokens ({s['num_tokens'] * self.dtype.itemsize} bytes)"
            )
        if s["num_tokens"]:
            last = np.memmap(f, dtype=self.dtype, mode="r")[-1]
            if last != self.eos_id:
                raise DataError(
                    f"{self.where}: shard {s['tokens']} ends with token {int(last)}, not EOS {self.eos_id}"
                )
        if verify and sha256_file(f) != s["sha256"]:
            raise DataError(f"{self.where}: shard {s['tokens']} does not match its sha256 in {INDEX}")

    def __getstate__(self):
        # Memory maps are reopened in each dataloader worker, never pickled as copies.
        return {**self.__dict__, "_tokens": {}, "_docs": {}, "_doc_labels": {}}

    def _shard_tokens(self, i: int) -> np.memmap:
        if i not in self._tokens:
            self._tokens[i] = np.memmap(self.path / self.shards[i]["tokens"], dtype=self.dtype, mode="r")
        return self._tokens[i]

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the stream repeated forever (int64)."""
        out = np.empty(n, dtype=np.int64)
        pos, filled = start % self.num_tokens, 0
        while filled < n:
            i = int(np.searchsorted(self.starts, pos, side="right")) - 1
            local = pos - self.starts[i]
            k = min(n - filled, int(self.starts[i + 1] - pos))
            out[filled : filled + k] = self._shard_tokens(i)[local : local + k]
            filled += k
            pos = (pos + k) % self.num_tokens
        if out.max() >= self.vocab_size:
            bad = int(out.max())
            raise DataError(
                f"{self.where}: token id {bad} near stream position {start % self.num_tokens} is "
                f">= the vocabulary size {self.vocab_size} (model.tokenizer_path / the shard index)"
            )
        return out

    def label_at(self, pos: int) -> str:
        """Label of the document holding stream position `pos` (taken modulo the stream)."""
        pos %= self.num_tokens
        i = int(np.searchsorted(self.starts, pos, side="right")) - 1
        if i not in self._docs:
            self._docs[i] = np.load(self.path / self.shards[i]["docs"], mmap_mode="r")
            self._doc_labels[i] = np.load(self.path / self.shards[i]["labels"], mmap_mode="r")
        d = int(np.searchsorted(self._docs[i], pos - self.starts[i], side="right"))
        return self.labels[int(self._doc_labels[i][d])]
