"""Split JSON-lines files into train / validation / test by document, as the paper's Megatron runs did.

The paper trains on The Pile's shards 01-29 with `--split 969,30,1`: Megatron cuts each dataset of the blend
(each shard file) into contiguous document ranges, the first 96.9 % for training, the next 3 % for validation,
the last 0.1 % for test (megatron/core/datasets/utils.py, get_train_valid_test_split_). The recipe's paper configs
read The Pile's own `validation` split instead; this script reproduces the paper's split from the shard files:

    python scripts/split_documents.py --out data/pile_split pile/01.jsonl.zst pile/02.jsonl.zst ... pile/29.jsonl.zst
    # -> data/pile_split/{train,valid,test}/01.jsonl ... ; then tokenize each folder with scripts/prepare_shards.py
    #    --path 'data/pile_split/train/*.jsonl' (and valid) and train with --training.dataset_path /
    #    --validation.dataset_path pointing at the two shard folders.
"""

import argparse
import io
import os
import sys

SPLITS = ("train", "valid", "test")


def split_bounds(num_documents: int, weights: tuple[float, ...] = (969, 30, 1)) -> list[int]:
    """Megatron's document boundaries: [0, end_train, end_valid, num_documents]."""
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * float(num_documents))))
    excess = bounds[-1] - num_documents
    return [bounds[0]] + [b - excess for b in bounds[1:]]


def _open_text(path: str):
    if path.endswith(".zst"):
        import zstandard

        return io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")), encoding="utf-8")
    return open(path, encoding="utf-8")


def split_file(path: str, out: str, weights: tuple[float, ...]) -> list[int]:
    """Write out/{train,valid,test}/<name>.jsonl; returns the number of documents in each."""
    with _open_text(path) as f:
        num_documents = sum(1 for line in f if line.strip())
    bounds = split_bounds(num_documents, weights)
    name = os.path.basename(path).split(".")[0] + ".jsonl"
    outputs = []
    for split in SPLITS:
        os.makedirs(os.path.join(out, split), exist_ok=True)
        outputs.append(open(os.path.join(out, split, name), "x", encoding="utf-8"))
    try:
        index = 0
        with _open_text(path) as f:
            for line in f:
                if not line.strip():
                    continue
                which = next(i for i in range(len(SPLITS)) if index < bounds[i + 1])
                outputs[which].write(line if line.endswith("\n") else line + "\n")
                index += 1
    finally:
        for o in outputs:
            o.close()
    return [bounds[i + 1] - bounds[i] for i in range(len(SPLITS))]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="jsonl or jsonl.zst files, one dataset of the blend each")
    p.add_argument("--out", required=True, help="output folder (gets train/, valid/, test/)")
    p.add_argument("--split", default="969,30,1", help="weights of train,valid,test (Megatron's --split)")
    a = p.parse_args(argv)
    try:
        weights = tuple(float(w) for w in a.split.split(","))
    except ValueError:
        sys.exit(f"--split {a.split!r}: expected three comma-separated numbers, e.g. 969,30,1")
    if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
        sys.exit(f"--split {a.split!r}: expected three non-negative weights with a positive sum")
    for path in a.files:
        if not os.path.isfile(path):
            sys.exit(f"{path}: no such file")
        try:
            counts = split_file(path, a.out, weights)
        except FileExistsError as e:
            sys.exit(f"{e.filename}: already exists; choose another --out")
        print(f"{path}: " + ", ".join(f"{n} {s}" for n, s in zip(counts, SPLITS)))


if __name__ == "__main__":
    main()
