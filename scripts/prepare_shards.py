"""Tokenize a corpus once into token shards that training reads by memory map.

    # The Pile (the paper's data), GPT-2 tokenizer, 16 processes:
    python scripts/prepare_shards.py --dataset monology/pile-uncopyrighted --split train \
        --tokenizer gpt2 --out data/pile_gpt2/train --workers 16
    python scripts/prepare_shards.py --dataset monology/pile-uncopyrighted --split validation \
        --tokenizer gpt2 --out data/pile_gpt2/val --workers 16
    # Local files (jsonl/parquet/txt, a folder or a glob):
    python scripts/prepare_shards.py --path 'data/raw/*.jsonl.zst' --tokenizer gpt2 --out data/mine
    # Check an existing folder against its index (sizes, EOS, sha256):
    python scripts/prepare_shards.py --verify data/pile_gpt2/train

Then train with `--training.dataset_path data/pile_gpt2/train` (and the same tokenizer in
`--model.tokenizer_path`). Source options mean what the `[data]` keys of the same name mean.
"""

import argparse
import os
import sys
import time

from remoe_recipe.data.config import Data
from remoe_recipe.data.prepare import write_shards
from remoe_recipe.data.shards import TokenShards
from remoe_recipe.data.sources import resolve_source


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="built-in name or Hugging Face dataset name")
    src.add_argument("--path", help="local jsonl/parquet/txt file, folder, glob or save_to_disk folder")
    src.add_argument("--verify", metavar="DIR", help="verify an existing shard folder and exit")
    p.add_argument("--out", help="output folder (gets index.json and the shard files)")
    p.add_argument("--tokenizer", default="gpt2", help="as model.tokenizer_path (default: gpt2)")
    p.add_argument("--split", default="train", help="Hugging Face split (default: train)")
    p.add_argument("--hf-config", default="", help="Hugging Face config/subset (e.g. en for allenai/c4)")
    p.add_argument("--no-streaming", action="store_true", help="download the HF dataset instead of streaming")
    p.add_argument("--text-field", default=Data.text_field)
    p.add_argument("--label-field", default=Data.label_field)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    p.add_argument("--shard-tokens", type=float, default=2**28, help="tokens per shard file (default 2^28)")
    p.add_argument("--batch-docs", type=int, default=256, help="documents per task sent to a worker")
    p.add_argument("--max-documents", type=int, default=None, help="stop after this many documents")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if not args.verify and not args.out:
        p.error("--out is required")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.verify:
        shards = TokenShards(args.verify, "--verify", verify=True)
        print(f"{args.verify}: OK, {len(shards.shards)} shards, {shards.num_tokens:,} tokens")
        return shards.index
    data = Data(
        text_field=args.text_field, label_field=args.label_field, hf_config=args.hf_config,
        split=args.split, streaming=not args.no_streaming,
    )
    label, source = resolve_source(args.dataset, args.path, "training", data)
    docs = source()
    if args.max_documents is not None:
        from itertools import islice

        docs = islice(docs, args.max_documents)
    t0 = time.perf_counter()
    index = write_shards(
        docs, args.tokenizer, args.out, workers=args.workers, shard_tokens=int(args.shard_tokens),
        batch_docs=args.batch_docs, source=label, overwrite=args.overwrite,
        progress=not args.no_progress, total=args.max_documents,
    )
    dt = time.perf_counter() - t0
    print(
        f"{args.out}: {index['num_documents']:,} documents, {index['num_tokens']:,} tokens "
        f"({index['dtype']}) in {len(index['shards'])} shards, {dt:.1f} s "
        f"({index['num_tokens'] / dt:,.0f} tokens/s), {len(index['labels'])} labels",
        file=sys.stderr,
    )
    return index


if __name__ == "__main__":
    main()
