"""Data throughput on this machine: tokenizer, streaming (tokenize-as-you-go) loader, shard loader.

    python benchmarks/data_throughput.py                                   # built-in corpus + BPE
    python benchmarks/data_throughput.py --tokenizer path/to/gpt2.tiktoken # the paper's tokenizer
    python benchmarks/data_throughput.py --source 'data/pile/*.jsonl' --workers 0,1,2,4 --model

Prints tokens/s delivered to the training loop (batches of local_batch_size x seq_len, the way
torchtitan receives them) per dataloader worker count, for both paths, and what that means for
a 182M model at ~400k tokens/s on one H100. Numbers, not a test: nothing is asserted.
"""

import argparse
import json
import math
import os
import tempfile
import time
from itertools import islice
from pathlib import Path

H100_182M_TOKENS_PER_S = 400_000


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="builtin", help="as model.tokenizer_path (default: builtin)")
    p.add_argument("--source", default="shakespeare", help="built-in name or a local file/folder/glob")
    p.add_argument("--text-field", default="text")
    p.add_argument("--max-documents", type=int, default=20_000, help="documents taken from --source")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16, help="local_batch_size (paper: 16)")
    p.add_argument("--workers", default="0,1,2", help="dataloader worker counts to measure")
    p.add_argument("--seconds", type=float, default=5.0, help="measuring time per configuration")
    p.add_argument("--prepare-workers", type=int, default=os.cpu_count())
    p.add_argument("--model", action="store_true", help="also time the debug model's training step on CPU")
    return p.parse_args(argv)


def documents(args) -> list[dict]:
    from remoe_recipe.data.config import Data
    from remoe_recipe.data.sources import looks_like_path, resolve_source

    path = args.source if looks_like_path(args.source) else None
    _, source = resolve_source(None if path else args.source, path, "training", Data(text_field=args.text_field))
    return list(islice(source(), args.max_documents))


def time_tokenizer(tok, docs, seconds) -> tuple[float, float]:
    """(tokens/s, MB of text/s) of encode_ordinary in this process."""
    n_tok = n_bytes = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for d in docs:
            n_tok += len(tok.encoding.encode_ordinary(d["text"])) + 1
            n_bytes += len(d["text"].encode())
        if not docs:
            break
    dt = time.perf_counter() - t0
    return n_tok / dt, n_bytes / dt / 1e6


def time_loader(loader, tokens_per_batch, seconds) -> float:
    """Tokens/s after the first batch (worker start-up excluded)."""
    it = iter(loader)
    next(it)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    return n * tokens_per_batch / (time.perf_counter() - t0)


def job_config(path, args, workers):
    from torchtitan.config import JobConfig

    from remoe_recipe.data.config import Data

    jc = JobConfig()
    jc.data = Data(text_field=args.text_field)
    jc.training.dataset_path = str(path)
    jc.training.seq_len, jc.training.local_batch_size = args.seq_len, args.batch
    jc.training.dataloader.num_workers = workers
    return jc


def time_debug_model(seconds) -> float:
    """Tokens/s of forward + backward + AdamW of the debug model (builtin vocab, seq 256, batch 8)."""
    import copy

    import torch

    from remoe_recipe.model import remoe_flavors, ReMoETransformer

    args = copy.deepcopy(remoe_flavors()["debugmodel"])
    args.vocab_size, args.max_seq_len = 4096, 256
    model = ReMoETransformer(args)
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 4096, (8, 257))
    steps, t0 = -1, None
    while t0 is None or time.perf_counter() - t0 < seconds:
        out = model(x[:, :-1])
        torch.nn.functional.cross_entropy(out.flatten(0, 1), x[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
        steps += 1
        if t0 is None:
            t0 = time.perf_counter()  # the first step warms up
    return steps * x[:, :-1].numel() / (time.perf_counter() - t0)


def main(argv=None) -> None:
    args = parse_args(argv)
    from remoe_recipe.data import build_dataloader, load_tokenizer
    from remoe_recipe.data.prepare import write_shards

    tok = load_tokenizer(args.tokenizer)
    docs = documents(args)
    workers = [int(w) for w in args.workers.split(",")]
    tokens_per_batch = args.batch * args.seq_len
    print(f"machine: {os.cpu_count()} cores; tokenizer {tok.encoding.name} (vocab {tok.get_vocab_size()}); "
          f"source {args.source}: {len(docs)} documents; batches {args.batch} x {args.seq_len}")
    rows = []
    tok_s, mb_s = time_tokenizer(tok, docs, args.seconds)
    rows.append(("tokenizer encode_ordinary", "-", tok_s, tok_s, f"{mb_s:.1f} MB text/s"))

    with tempfile.TemporaryDirectory() as tmp:
        jsonl = Path(tmp) / "docs.jsonl"
        with open(jsonl, "w") as f:
            for d in docs:
                f.write(json.dumps({args.text_field: d["text"]}) + "\n")
        for w in workers:
            r = time_loader(build_dataloader(1, 0, tok, job_config(jsonl, args, w)), tokens_per_batch, args.seconds)
            rows.append(("streaming: jsonl -> tokenize -> pack", w, r, r / max(w, 1), ""))
        # With 8 data-parallel ranks each rank reads (parses) every document and tokenizes 1/8.
        r = time_loader(build_dataloader(8, 0, tok, job_config(jsonl, args, 1)), tokens_per_batch, args.seconds)
        rows.append(("streaming, dp rank 0 of 8", 1, r, r, "reads all, tokenizes 1/8"))

        t0 = time.perf_counter()
        index = write_shards(docs, args.tokenizer, Path(tmp) / "shards", workers=args.prepare_workers,
                             progress=False)
        prep = index["num_tokens"] / (time.perf_counter() - t0)
        rows.append(("prepare_shards (tokenize + write)", f"{args.prepare_workers} procs", prep,
                     prep / args.prepare_workers, f"{index['num_tokens']:,} tokens"))
        for w in workers:
            r = time_loader(build_dataloader(1, 0, tok, job_config(Path(tmp) / "shards", args, w)),
                            tokens_per_batch, args.seconds)
            rows.append(("shards: memmap -> pack", w, r, r / max(w, 1), ""))
    if args.model:
        r = time_debug_model(args.seconds)
        rows.append(("debug model train step (consumer, CPU)", "-", r, r, "seq 256 x batch 8"))

    print(f"\n{'path':42} {'workers':>9} {'tokens/s':>12} {'per worker':>12}  note")
    for name, w, r, per, note in rows:
        print(f"{name:42} {w!s:>9} {r:12,.0f} {per:12,.0f}  {note}")

    stream_per_worker = min(per for name, w, r, per, _ in rows if name.startswith("streaming") and w != 0)
    shard_main = next(r for name, w, r, _, _ in rows if name.startswith("shards") and w == 0)
    need = H100_182M_TOKENS_PER_S
    print(
        f"\n182M on one H100 consumes ~{need:,} tokens/s per GPU. Streaming supplies >= {stream_per_worker:,.0f} "
        f"tokens/s per worker here (slowest row): >= {math.ceil(need / stream_per_worker)} dataloader workers (cores) "
        f"per GPU, {8 * math.ceil(need / stream_per_worker)} for 8 GPUs. Shards supply {shard_main:,.0f} tokens/s "
        f"in the training process itself (workers = 0), {shard_main / need:.1f}x the need."
    )


if __name__ == "__main__":
    main()
