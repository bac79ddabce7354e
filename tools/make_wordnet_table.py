#!/usr/bin/env python3
"""Regenerate ``larvseg/data/classlists/wordnet_in21k.tsv.gz`` from WordNet 3.0.

Source: Princeton WordNet 3.0 as Debian/Ubuntu package it (``apt-get install wordnet-base``, version
1:3.0-37 here): its noun database ``/usr/share/wordnet/data.noun`` and ``index.noun``. ImageNet-21K
wnids are WordNet 3.0 noun offsets (``n`` + 8 digits), so the table covers exactly the 21,843 synsets
of ``classlists/imagenet21k_synsets.tsv`` and all their ancestors up to ``entity`` (n00001740).
The WordNet licence allows redistribution with its copyright notice, which the file's header carries.

    python tools/make_wordnet_table.py                 # writes the packaged file
    python tools/make_wordnet_table.py --check         # exit 1 unless the packaged file is bit-for-bit what it would write

Output (UTF-8 text, gzip with mtime 0 and no file name, level 9: the same input gives the same bytes):
``#`` header lines (source, licence), then one line per synset, sorted by wnid:

    wnid <TAB> is-a parents (space-separated wnids: hypernyms and instance hypernyms) <TAB> lemmas <TAB> gloss

Lemmas are "|"-separated, in WordNet's order, underscores as spaces; a lemma that is not the most frequent
noun sense of its word carries its sense number from index.noun, ``crane#5`` (the bird is the fifth sense of
"crane"; no suffix = sense 1). The gloss is the definition without its examples, cut at 80 characters.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLASSLISTS = REPO / "larvseg" / "data" / "classlists"
OUTPUT = CLASSLISTS / "wordnet_in21k.tsv.gz"
SYNSETS = CLASSLISTS / "imagenet21k_synsets.tsv"
WORDNET_DIR = Path("/usr/share/wordnet")
ENTITY = "n00001740"
GLOSS_CHARS = 80
IS_A = ("@", "@i")  # hypernym, instance hypernym


def read_data_noun(path: Path) -> dict[str, tuple[list[str], list[str], str]]:
    """wnid -> (lemmas as written, is-a parents, gloss) of every noun synset; the licence header is skipped."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):  # licence header lines start with two spaces
            continue
        head, _, gloss = line.partition(" | ")
        f = head.split()
        offset, w_cnt = f[0], int(f[3], 16)
        lemmas = [f[4 + 2 * k] for k in range(w_cnt)]
        pos = 4 + 2 * w_cnt
        p_cnt = int(f[pos])
        parents = []
        for k in range(p_cnt):
            symbol, target, target_pos = f[pos + 1 + 4 * k : pos + 4 + 4 * k]
            if symbol in IS_A and target_pos == "n":
                parents.append("n" + target)
        out["n" + offset] = (lemmas, parents, gloss.strip())
    return out


def read_index_noun(path: Path) -> dict[str, list[str]]:
    """lower-case lemma (underscores) -> its noun synsets, most frequent sense first."""
    out = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):
            continue
        f = line.split()
        synset_cnt, p_cnt = int(f[2]), int(f[3])
        out[f[0]] = ["n" + o for o in f[6 + p_cnt : 6 + p_cnt + synset_cnt]]
    return out


def short_gloss(gloss: str) -> str:
    """The definition without its quoted examples, at most GLOSS_CHARS characters (cut at a word)."""
    definition = gloss.split('; "')[0].split(' "')[0].strip().rstrip(";").strip()
    if len(definition) <= GLOSS_CHARS:
        return definition
    return definition[: GLOSS_CHARS - 1].rsplit(" ", 1)[0].rstrip(",;:") + "…"


def imagenet_wnids(path: Path) -> list[str]:
    return [line.split("\t", 1)[0] for line in path.read_text().splitlines() if line and not line.startswith("#")]


def licence_header(data_noun: Path) -> list[str]:
    lines = []
    for line in data_noun.read_text(encoding="utf-8").splitlines():
        if not line.startswith("  "):
            break
        lines.append(line.split(" ", 3)[-1].rstrip() if line.strip()[:1].isdigit() else "")
    return lines


def build_table(wordnet_dir: Path, synsets_file: Path) -> bytes:
    data_noun, index_noun = wordnet_dir / "data.noun", wordnet_dir / "index.noun"
    data, index = read_data_noun(data_noun), read_index_noun(index_noun)
    wanted = imagenet_wnids(synsets_file)
    missing = [w for w in wanted if w not in data]
    if missing:
        raise SystemExit(f"{len(missing)} ImageNet-21K wnids are not WordNet 3.0 nouns: {missing[:10]}")
    keep, stack = set(), list(wanted)
    while stack:  # every ancestor, along hypernyms and instance hypernyms
        w = stack.pop()
        if w not in keep:
            keep.add(w)
            stack.extend(data[w][1])
    if ENTITY not in keep:
        raise SystemExit(f"{ENTITY} (entity) is not an ancestor: is {data_noun} WordNet 3.0?")
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (data_noun, index_noun)}
    lines = [
        "# WordNet 3.0 nouns of the ImageNet-21K synsets and their ancestors: wnid, is-a parents, lemmas, gloss.",
        "# Generated by tools/make_wordnet_table.py (see it for the format) from Debian's wordnet-base:",
        *(f"#   {name} sha256 {digest}" for name, digest in digests.items()),
        f"# {len(keep)} synsets ({len(wanted)} ImageNet-21K synsets and their ancestors).",
        "#",
        *(f"# {line}".rstrip() for line in licence_header(data_noun)),
    ]
    for w in sorted(keep):
        lemmas, parents, gloss = data[w]
        entries = []
        for lemma in lemmas:
            text = lemma.replace("_", " ")
            if any(c in text for c in "|#\t"):
                raise SystemExit(f"{w}: lemma {lemma!r} contains a separator character")
            sense = index[lemma.lower()].index(w) + 1
            entries.append(text if sense == 1 else f"{text}#{sense}")
        lines.append("\t".join([w, " ".join(parents), "|".join(entries), short_gloss(gloss)]))
    text = ("\n".join(lines) + "\n").encode("utf-8")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as f:
        f.write(text)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet", type=Path, default=WORDNET_DIR, help="folder holding data.noun and index.noun")
    parser.add_argument("--out", type=Path, default=OUTPUT, help="file to write")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args(argv)
    table = build_table(args.wordnet, SYNSETS)
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == table
        print(f"{args.out}: {'identical to' if same else 'DIFFERS from'} the regenerated table")
        return 0 if same else 1
    args.out.write_bytes(table)
    print(f"wrote {args.out} ({len(table)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
