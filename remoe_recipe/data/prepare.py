"""Tokenize a document source once, in parallel, into token shards (see shards.py).

The main process reads documents in order and hands batches of texts to a process pool;
`imap` returns the batches in order, so the shards are the same for any number of workers.
"""

import multiprocessing as mp
from collections.abc import Iterable, Iterator
from collections import deque
from itertools import chain, islice

import numpy as np
from tqdm import tqdm

from remoe_recipe.data.shards import ShardWriter
from remoe_recipe.data.tokenizer import load_tokenizer

_TOKENIZER = None


def _init_worker(tokenizer_spec: str) -> None:
    global _TOKENIZER
    _TOKENIZER = load_tokenizer(tokenizer_spec)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All documents of a batch, each with its EOS, as one array (cheap to send back) + lengths."""
    eos = _TOKENIZER.eos_id
    docs = [_TOKENIZER.encoding.encode_ordinary(t) + [eos] for t in texts]
    lengths = np.fromiter(map(len, docs), dtype=np.int64, count=len(docs))
    tokens = np.fromiter(chain.from_iterable(docs), dtype=np.int64, count=int(lengths.sum()))
    return tokens, lengths


def _batches(docs: Iterable[dict], size: int) -> Iterator[tuple[list[str], list[str]]]:
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield [d["text"] for d in batch], [d["source"] for d in batch]


def write_shards(
    docs: Iterable[dict],
    tokenizer_spec: str,
    out_dir,
    workers: int = 1,
    shard_tokens: int = 1 << 28,
    batch_docs: int = 256,
    source: str = "",
    overwrite: bool = False,
    progress: bool = True,
    total: int | None = None,
) -> dict:
    """Tokenize `docs` ({"text", "source"} dicts) with `tokenizer_spec` (as model.tokenizer_path)
    into shards under out_dir; returns the index. workers <= 1 tokenizes in this process."""
    tokenizer = load_tokenizer(tokenizer_spec)
    writer = ShardWriter(
        out_dir, tokenizer, tokenizer.encoding.name, shard_tokens=shard_tokens, source=source,
        overwrite=overwrite,
    )
    bar = tqdm(total=total, unit="doc", unit_scale=True, disable=not progress, desc="tokenizing")
    n_docs = n_tokens = 0

    def write(result, labels):
        nonlocal n_docs, n_tokens
        tokens, lengths = result
        writer.add(tokens, lengths, labels)
        n_docs += len(lengths)
        n_tokens += int(lengths.sum())
        bar.update(len(lengths))
        bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)

    if workers > 1:
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_spec,)) as pool:
            # A bounded window of batches in flight (Pool.imap would read the whole source
            # ahead into memory); results are written in submission order.
            pending: deque = deque()
            for texts, labels in _batches(docs, batch_docs):
                pending.append((pool.apply_async(_encode_batch, (texts,)), labels))
                if len(pending) >= 4 * workers:
                    job, labels = pending.popleft()
                    write(job.get(), labels)
            while pending:
                job, labels = pending.popleft()
                write(job.get(), labels)
    else:
        _init_worker(tokenizer_spec)
        for texts, labels in _batches(docs, batch_docs):
            write(_encode_batch(texts), labels)
    bar.close()
    if n_docs == 0:
        raise ValueError(f"{source or out_dir}: no documents to tokenize (empty source)")
    return writer.close()
