"""WordNet 3.0 for the ImageNet-21K synsets: every lemma, a short gloss, and the is-a hierarchy.

ImageNet-21K wnids are WordNet 3.0 noun offsets (``n`` + 8 digits). ``classlists/wordnet_in21k.tsv.gz``
holds the 21,843 synsets and all their ancestors up to ``entity`` (23,547 synsets): is-a parents
(hypernyms and instance hypernyms), lemmas with their sense numbers, and the definition cut at 80
characters. ``tools/make_wordnet_table.py`` regenerates it bit-for-bit from Debian's ``wordnet-base``
(the header of the file carries the WordNet licence).

    wn = wordnet()
    wn.senses("crane")             # ['n03126707', 'n02012849']: the synsets of the word, most frequent first
    wn.is_a("n02088364", "n02084071")   # beagle is a dog: True
    wn.descendants("n02084071")    # dog and every synset below it
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from larvseg.data.vocabulary import CLASSLIST_DIR, normalize_name

WORDNET_TABLE = CLASSLIST_DIR / "wordnet_in21k.tsv.gz"
WNID = re.compile(r"^n\d{8}$")


def is_wnid(text: str) -> bool:
    """``n`` followed by 8 digits: a WordNet 3.0 noun synset id (as ImageNet names its classes)."""
    return bool(WNID.match(text.strip()))


@dataclass(frozen=True)
class Synset:
    wnid: str
    parents: tuple[str, ...]  # is-a: hypernyms and instance hypernyms
    lemmas: tuple[str, ...]  # as WordNet writes them, underscores as spaces ("Canis familiaris")
    gloss: str  # the definition, at most 80 characters

    @property
    def name(self) -> str:
        return self.lemmas[0]

    def describe(self) -> str:
        """``n02012849 crane: large long-necked wading bird ...`` (for messages)."""
        return f"{self.wnid} {', '.join(self.lemmas[:3])}: {self.gloss}"


class WordNet:
    """The packaged synsets: lookup by wnid, by word (sense order), and along the hierarchy."""

    def __init__(self, path: Path = WORDNET_TABLE) -> None:
        self.synsets: dict[str, Synset] = {}
        ranked: dict[str, list[tuple[int, str]]] = {}
        self.children: dict[str, list[str]] = {}
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.startswith("#"):
                    continue
                wnid, parents, lemmas, gloss = line.rstrip("\n").split("\t")
                names = []
                for entry in lemmas.split("|"):
                    lemma, _, sense = entry.partition("#")
                    names.append(lemma)
                    ranked.setdefault(normalize_name(lemma), []).append((int(sense or 1), wnid))
                self.synsets[wnid] = Synset(wnid, tuple(parents.split()), tuple(names), gloss)
                for parent in parents.split():
                    self.children.setdefault(parent, []).append(wnid)
        # word -> synsets, most frequent sense first (WordNet's index.noun order; a word may have senses
        # outside the table, so the ranks have gaps). "Crane" the poet and "crane" the bird are one word.
        self._senses = {word: [w for _, w in sorted(set(pairs))] for word, pairs in ranked.items()}

    def __contains__(self, wnid: str) -> bool:
        return wnid in self.synsets

    def __len__(self) -> int:
        return len(self.synsets)

    def __getitem__(self, wnid: str) -> Synset:
        return self.synsets[wnid]

    def senses(self, word: str) -> list[str]:
        """The synsets one of whose lemmas is ``word`` (normalised as class names), most frequent first."""
        return list(self._senses.get(normalize_name(word), []))

    def words(self) -> dict[str, list[str]]:
        """Every normalised lemma -> its synsets, most frequent sense first."""
        return self._senses

    def ancestors(self, wnid: str) -> set[str]:
        """Every synset above ``wnid`` along is-a edges (not ``wnid`` itself)."""
        seen: set[str] = set()
        stack = list(self.synsets[wnid].parents)
        while stack:
            w = stack.pop()
            if w not in seen:
                seen.add(w)
                stack.extend(self.synsets[w].parents)
        return seen

    def descendants(self, wnid: str) -> set[str]:
        """``wnid`` and every synset below it."""
        seen = {wnid}
        stack = list(self.children.get(wnid, ()))
        while stack:
            w = stack.pop()
            if w not in seen:
                seen.add(w)
                stack.extend(self.children.get(w, ()))
        return seen

    def is_a(self, wnid: str, ancestor: str) -> bool:
        return ancestor in self.ancestors(wnid)


@lru_cache(maxsize=1)
def wordnet() -> WordNet:
    """The packaged table, read once (about 0.2 s)."""
    return WordNet()
