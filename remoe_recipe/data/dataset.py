"""Packed next-token samples from a document source, tokenized as they are read."""

from itertools import islice
from typing import Any

import torch
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from remoe_recipe.data.documents import DataError, Source
from remoe_recipe.data.packing import PackedDataset

# Fewer samples than this in one pass over a rank's documents: the run trains on a tiny corpus over and
# over. Warned once; the per-epoch log lines are then dropped (they would come every few steps).
SHORT_CORPUS_SAMPLES = 8


class PackedTextDataset(PackedDataset):
    """Packs documents into samples (see PackedDataset): x = buf[:seq_len], y = buf[1:seq_len + 1].

    Every document is tokenized with one EOS appended (the official --append-eod) and appended
    to a token buffer; consecutive samples start seq_len tokens apart, so the last label of one
    sample is the first input of the next and no token is dropped or padded. Leftover tokens
    carry over to the next document and, when `infinite`, to the next epoch; a finite (one
    pass) dataset drops the last < seq_len + 1 tokens and restarts on the next iteration.

    Shuffling (shuffle_window = W > 0): the documents are read in consecutive windows of W and each
    window is permuted by a generator seeded from (shuffle_seed, epoch, window index), so document i of
    the shuffled order is known from i alone and a resume re-reads only its window.

    Sharding: document i (in source order, or shuffled order) goes to dp rank i % dp_world_size; with dataloader
    workers, a rank's j-th document goes to worker j % num_workers. Each (rank, worker) packs
    its own stream.

    State (per worker, saved by StatefulDataLoader): next document index, epoch, the unread
    part of the token buffer (and with return_source, the labels of its runs). Restoring it replays
    the exact same samples.

    vocab_size: a token id at or above it is an error naming the document (by default the
    tokenizer's vocabulary; the model's embedding is at least that large).
    """

    def __init__(
        self,
        source: Source,
        tokenizer: BaseTokenizer,
        seq_len: int,
        dp_rank: int = 0,
        dp_world_size: int = 1,
        infinite: bool = True,
        return_source: bool = False,
        restart_each_iter: bool = False,
        name: str = "dataset",
        vocab_size: int | None = None,
        shuffle_window: int = 0,
        shuffle_seed: int = 0,
    ) -> None:
        if shuffle_window < 0:
            raise ValueError(f"data.shuffle_window = {shuffle_window}: expected >= 0")
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no eos_id; documents need an EOS separator")
        super().__init__(seq_len, dp_rank, dp_world_size, infinite, return_source, restart_each_iter, name)
        self.source = source
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or tokenizer.get_vocab_size()
        self.shuffle_window, self.shuffle_seed = shuffle_window, shuffle_seed
        self._epoch = 0
        self._short_warned = False

    def _reset_position(self) -> None:
        self._doc_idx = 0  # index in the whole source (all ranks) of the next document to read
        self._buffer: list[int] = []
        self._pos = 0  # tokens of _buffer before _pos are already consumed
        self._segments: list[list] = []  # [source label, n tokens] runs of _buffer[_pos:]

    def _samples(self, stride: int, offset: int):
        seq_len = self.seq_len
        while True:
            n_docs = n_samples = 0
            fresh = self._doc_idx == 0 and not self._buffer
            whole_pass = self._doc_idx == 0
            # The source skips the documents before _doc_idx (read before the resumed state).
            docs = self._documents(self._doc_idx)
            try:
                for i, doc in docs:
                    if i % stride != offset:
                        continue
                    self._add_document(doc, i)
                    self._doc_idx = i + 1
                    n_docs += 1
                    while len(self._buffer) - self._pos > seq_len:
                        n_samples += 1
                        yield self._next_sample(seq_len)
            finally:
                docs.close()  # release the file now, not at garbage collection
            if not self.infinite:
                # One pass; the next iteration (next validation run) starts over.
                self._reset_position()
                self._epoch += 1
                if fresh and n_samples == 0:
                    raise DataError(
                        f"{self.name}: a full pass gave no sample of {seq_len + 1} tokens for dp "
                        f"rank {self.dp_rank} (of {self.dp_world_size}) and this dataloader worker"
                    )
                return
            if n_docs == 0 and self._doc_idx == 0:
                raise DataError(
                    f"{self.name}: no documents for dp rank {self.dp_rank} (of "
                    f"{self.dp_world_size}) and this dataloader worker; the source has too "
                    "few documents for this many ranks/workers"
                )
            self._epoch += 1
            self._doc_idx = 0
            if whole_pass and n_samples < SHORT_CORPUS_SAMPLES and not self._short_warned:
                self._short_warned = True
                logger.warning(
                    f"{self.name}: one pass over the data gives only {n_samples} samples of {seq_len + 1} "
                    f"tokens ({n_docs} documents) for dp rank {self.dp_rank}: training repeats them over "
                    "and over; use more data or a shorter training.seq_len"
                )
            if not self._short_warned:
                logger.info(f"{self.name}: dp rank {self.dp_rank} starts epoch {self._epoch}")

    def _documents(self, start: int):
        """(index, document) from index `start` of this epoch's order (source order, or shuffled)."""
        window = self.shuffle_window
        if not window:
            docs = self.source(start=start)
            try:
                yield from enumerate(docs, start)
            finally:
                if hasattr(docs, "close"):
                    docs.close()
            return
        block = start // window
        docs = self.source(start=block * window)
        try:
            while True:
                chunk = list(islice(docs, window))
                if not chunk:
                    return
                seed = ((self.shuffle_seed * 1_000_003 + self._epoch) * 1_000_003 + block) % 2**63
                g = torch.Generator().manual_seed(seed)
                order = torch.randperm(len(chunk), generator=g).tolist()
                for k, j in enumerate(order):
                    if block * window + k >= start:
                        yield block * window + k, chunk[j]
                if len(chunk) < window:
                    return
                block += 1
        finally:
            if hasattr(docs, "close"):
                docs.close()

    def _add_document(self, doc: dict, index: int) -> None:
        tokens = self.tokenizer.encode(doc["text"], add_bos=False, add_eos=True)
        if tokens and max(tokens) >= self.vocab_size:
            raise DataError(
                f"{self.name}: document {index} has token id {max(tokens)} >= the vocabulary "
                f"size {self.vocab_size} (model.tokenizer_path)"
            )
        # Drop consumed tokens before growing, so the buffer stays about one document long.
        del self._buffer[: self._pos]
        self._pos = 0
        self._buffer.extend(tokens)
        if self.return_source:
            self._segments.append([str(doc.get("source", self.name)), len(tokens)])

    def _next_sample(self, seq_len: int):
        window = torch.tensor(self._buffer[self._pos : self._pos + seq_len + 1], dtype=torch.long)
        self._pos += seq_len
        return self._sample(window, self._consume_segments(seq_len) if self.return_source else None)

    def _consume_segments(self, n: int) -> str:
        first = self._segments[0][0]
        while n > 0:
            k = min(n, self._segments[0][1])
            self._segments[0][1] -= k
            n -= k
            if self._segments[0][1] == 0:
                self._segments.pop(0)
        return first

    def _position_state(self) -> dict[str, Any]:
        # Copies: the saved state must not change when iteration continues.
        state = {
            "doc_idx": self._doc_idx,
            "epoch": self._epoch,
            "token_buffer": self._buffer[self._pos :],
        }
        if self.return_source:
            state["segments"] = [list(s) for s in self._segments]
        return state

    def _load_position(self, state: dict[str, Any]) -> None:
        self._doc_idx = state["doc_idx"]
        self._epoch = state["epoch"]
        self._buffer = list(state["token_buffer"])
        self._pos = 0
        self._segments = [list(s) for s in state.get("segments", [])]
        if self.return_source and not self._segments and self._buffer:
            self._segments = [["unknown", len(self._buffer)]]
