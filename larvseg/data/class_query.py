"""Class queries in words: WordNet aliases, wnids and concepts (a synset and its descendants) over a vocabulary.

A query is a list of terms (``--classes "automobile, dog*"``, ``classes=[...]``, ``eval.classes``). Each term is

- a class name of the vocabulary, matched after normalisation (case, '-', '_', spaces): that class;
- a wnid (``n02012849``): the class of that ImageNet synset;
- any WordNet lemma of a synset the vocabulary has (``automobile``, ``auto``, ``Canis familiaris``). A word
  with several senses is resolved by one rule: the first sense, in WordNet's frequency order, that the
  vocabulary has (among its trained classes when the checkpoint records them, else among all). The choice and
  the other senses, with their wnids and glosses, are reported in ``notes``; a wnid picks another;
- a concept, the term followed by ``*`` (``dog*``, ``n02084071*``): the synset (chosen by the same rule, among
  the senses with a class of the vocabulary at or below them) and every descendant the vocabulary has,
  scored as one class reported under the name asked for. With trained classes recorded, only those are
  members (unless none is). A class named explicitly elsewhere in the query is not a member, and a class
  under two concepts belongs to the smaller one (ties: the first asked).

The vocabulary's classes are tied to synsets through the ImageNet-21K naming (``imagenet_class_names``: the
synsets matched to ADE classes, the others by lemma or ``lemma (wnid)``), so "automobile" finds ADE's "car"
in any model whose vocabulary has it. Classes without a synset (most COCO-Stuff / ADE stuff classes) are
found by their own name only.

Prediction scores the union of all members (one class set for the inference path, bounded argmax included)
and maps each pixel's winning class to its query class (``label_lut``): the label of a concept is the class
of the descendant with the highest logit, i.e. the argmax over concepts of the max over their members'
logits, evaluated per pixel. Plain classes keep their union id as label value (reported under the name
asked for); concept k gets the value ``len(vocabulary) + k``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from larvseg.data.overlay import Prediction, class_areas
from larvseg.data.vocabulary import UnknownClassError, class_terms, imagenet_class_names, normalize_name
from larvseg.data.wordnet import WordNet, is_wnid, wordnet

CONCEPT_MARK = "*"
MAX_LISTED_SENSES = 6
_WNID_SUFFIX = re.compile(r"\((n\d{8})\)\s*$")


@dataclass
class QueryClass:
    name: str  # reported name: the term as asked (normalised), or the class name for a wnid
    members: list[int]  # positions in the vocabulary scored for it (one for a plain class)
    concept: bool
    wnid: str | None = None  # the synset it was resolved to, when there is one


@dataclass
class ClassQuery:
    """A resolved query over a vocabulary of ``len(vocab_names)`` classes."""

    classes: list[QueryClass]
    vocab_names: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def class_ids(self) -> np.ndarray:
        """Positions of every class scored (sorted, int64): the class set of the inference."""
        return np.array(sorted({i for c in self.classes for i in c.members}), dtype=np.int64)

    @property
    def concepts(self) -> list[QueryClass]:
        return [c for c in self.classes if c.concept]

    @property
    def output_names(self) -> list[str]:
        """Name of every label value: the vocabulary's, plain classes renamed as asked, concepts appended."""
        names = list(self.vocab_names)
        for c in self.classes:
            if not c.concept:
                names[c.members[0]] = c.name
        return names + [c.name for c in self.concepts]

    @property
    def label_lut(self) -> np.ndarray:
        """(len(vocab_names),) int64: the label value of each scored class (identity for plain classes)."""
        lut = np.arange(len(self.vocab_names), dtype=np.int64)
        for k, c in enumerate(self.concepts):
            lut[c.members] = len(self.vocab_names) + k
        return lut

    def prediction(self, class_map: np.ndarray, breakdown: bool = True) -> Prediction:
        """The Prediction of a map of predicted vocabulary positions: labels, names and areas as asked for,
        and per concept the fraction of the image taken by each of its member classes (``breakdown``)."""
        labels = self.label_lut[class_map]
        names = self.output_names
        parts: dict[str, dict[str, float]] = {}
        if breakdown and self.concepts:
            present = class_areas(class_map, self.vocab_names)
            for c in self.concepts:
                members = {self.vocab_names[i] for i in c.members}
                parts[c.name] = {n: a for n, a in present.items() if n in members}
        return Prediction(labels, names, class_areas(labels, names), parts)


class ClassResolver:
    """Resolves query terms against one vocabulary (class names by position); build once per model."""

    def __init__(
        self,
        names: Sequence[str],
        preferred: Sequence[int] | np.ndarray | None = None,
        what: str = "the checkpoint's vocabulary",
        wn: WordNet | None = None,
    ) -> None:
        self.names = list(names)
        self.what = what
        self.wn = wn or wordnet()
        self.preferred = None if preferred is None or not len(preferred) else {int(i) for i in preferred}
        self.by_name = {normalize_name(n): i for i, n in enumerate(self.names)}
        # synset -> position, through the ImageNet naming (both ADE matchings) and "lemma (wnid)" names
        self.by_wnid: dict[str, int] = {}
        for preferred_list in ("ade847", "ade150"):
            for wnid, name in imagenet_class_names(preferred_list).items():
                i = self.by_name.get(normalize_name(name))
                if i is not None:
                    self.by_wnid.setdefault(wnid, i)
        for i, name in enumerate(self.names):
            m = _WNID_SUFFIX.search(name)
            own = m.group(1) if m else (name if is_wnid(name) else None)
            if own is not None:
                self.by_wnid.setdefault(own, i)
        self._subtrees: dict[str, frozenset[int]] = {}
        self.wnids_of: dict[int, list[str]] = {}
        for wnid, i in sorted(self.by_wnid.items()):
            self.wnids_of.setdefault(i, []).append(wnid)

    # ------------------------------------------------------------------------------------------
    def _rank(self, ids: set[int]) -> int:
        """0: holds a preferred (trained) class, 1: holds a class, 2: holds none."""
        if not ids:
            return 2
        return 0 if self.preferred is None or ids & self.preferred else 1

    def _subtree(self, wnid: str) -> set[int]:
        """Positions of the classes at or below ``wnid`` (cached: autocompletion asks for many)."""
        if wnid not in self._subtrees:
            self._subtrees[wnid] = frozenset(self.by_wnid[w] for w in self.wn.descendants(wnid) if w in self.by_wnid)
        return set(self._subtrees[wnid])

    def _pick(self, term: str, candidates: list[str], ids_of) -> tuple[str | None, list[str]]:
        """The first candidate of the best rank, and notes naming it and the other senses."""
        ranked = [(self._rank(ids_of(w)), k, w) for k, w in enumerate(candidates)]
        best = min(ranked, default=(2, 0, None))
        chosen = best[2]
        if best[0] == 2 or chosen is None:  # None: no candidates
            return None, []
        others = [w for w in candidates if w != chosen and ids_of(w)]  # the senses one could pick instead
        notes = []
        if others:
            listed = "; ".join(self.wn[w].describe() for w in others[:MAX_LISTED_SENSES])
            more = f"; and {len(others) - MAX_LISTED_SENSES} more" if len(others) > MAX_LISTED_SENSES else ""
            notes.append(
                f"{term!r} is ambiguous: took {self.wn[chosen].describe()}. Other senses: {listed}{more}. "
                f"Ask for a wnid (e.g. {others[0]}) to pick another"
            )
        return chosen, notes

    def _unknown(self, term: str) -> UnknownClassError:
        return UnknownClassError(f"classes not in {self.what} of {len(self.names)}: [{term!r}]")

    def resolve_term(self, term: str) -> tuple[QueryClass, list[str]]:
        """One term -> its QueryClass and notes; UnknownClassError when nothing in the vocabulary matches."""
        text = term.strip()
        concept = text.endswith(CONCEPT_MARK)
        word = text[: -len(CONCEPT_MARK)].strip() if concept else text
        key = normalize_name(word)
        if not key:
            raise UnknownClassError(f"empty class name in {term!r}")
        if concept:
            return self._concept(word, key)
        if key in self.by_name:  # the vocabulary's own name wins; other senses are mentioned
            i = self.by_name[key]
            others = [w for w in self.wn.senses(word) if w in self.by_wnid and self.by_wnid[w] != i]
            notes = []
            if others:
                listed = "; ".join(self.wn[w].describe() for w in others[:MAX_LISTED_SENSES])
                notes.append(
                    f"{word!r} is the class {self.names[i]!r}; the word also names {listed}. "
                    f"Ask for a wnid (e.g. {others[0]}) to pick another"
                )
            return QueryClass(key, [i], False, next(iter(self.wnids_of.get(i) or []), None)), notes
        if is_wnid(key):
            if key not in self.by_wnid:
                known = f" ({self.wn[key].describe()})" if key in self.wn else ""
                raise UnknownClassError(f"wnid {key}{known} is not in {self.what} of {len(self.names)}")
            i = self.by_wnid[key]
            return QueryClass(normalize_name(self.names[i]), [i], False, key), []
        chosen, notes = self._pick(
            word, self.wn.senses(word), lambda w: {self.by_wnid[w]} if w in self.by_wnid else set()
        )
        if chosen is None:
            raise self._unknown(word)
        return QueryClass(key, [self.by_wnid[chosen]], False, chosen), notes

    def _concept(self, word: str, key: str) -> tuple[QueryClass, list[str]]:
        own: set[int] = set()
        if is_wnid(key):
            if key not in self.wn:
                raise UnknownClassError(f"concept {word}*: {key} is not an ImageNet-21K synset or an ancestor of one")
            candidates, name = [key], self.wn[key].name
        else:
            own = {self.by_name[key]} if key in self.by_name else set()
            candidates = [w for i in own for w in self.wnids_of.get(i, [])] + self.wn.senses(word)
            candidates, name = list(dict.fromkeys(candidates)), key
        chosen, notes = self._pick(word, candidates, lambda w: self._subtree(w) | own)
        if chosen is None:
            if own:  # a class without a synset: the concept is the class itself
                return QueryClass(normalize_name(name), sorted(own), True), [
                    f"{word}*: the class {self.names[min(own)]!r} has no WordNet synset here, so no descendants"
                ]
            raise UnknownClassError(
                f"concept {word}*: no class of {self.what} of {len(self.names)} is "
                f"{'a sense of ' + repr(word) if not is_wnid(key) else key} or below it"
            )
        members = self._subtree(chosen) | own
        if self.preferred is not None and members & self.preferred and members - self.preferred:
            left_out = len(members - self.preferred)
            members &= self.preferred
            notes.append(f"{word}*: {left_out} class(es) at or below {chosen} had no training data and are left out")
        return QueryClass(normalize_name(name), sorted(members), True, chosen), notes

    # ------------------------------------------------------------------------------------------
    def resolve(self, terms: Sequence[str]) -> ClassQuery:
        """Resolve every term; unknown terms are reported together (UnknownClassError)."""
        resolved, notes, unknown = [], [], []
        for term in terms:
            try:
                qc, term_notes = self.resolve_term(term)
            except UnknownClassError as exc:
                unknown.append((term.strip(), str(exc)))
                continue
            resolved.append(qc)
            notes += term_notes
        if unknown:
            if len(unknown) == 1:
                raise UnknownClassError(unknown[0][1])
            raise UnknownClassError(f"classes not in {self.what} of {len(self.names)}: {[t for t, _ in unknown][:10]}")
        plain: dict[int, QueryClass] = {}
        for qc in resolved:
            if not qc.concept:
                if qc.members[0] in plain:
                    notes.append(
                        f"{qc.name!r} is the same class as {plain[qc.members[0]].name!r}; reported as the latter"
                    )
                    continue
                plain[qc.members[0]] = qc
        concepts = [qc for qc in resolved if qc.concept]
        owner: dict[int, int] = {}  # class -> concept: the smallest concept that holds it (ties: first asked)
        for k in sorted(range(len(concepts)), key=lambda k: (len(concepts[k].members), k)):
            for i in concepts[k].members:
                if i not in plain:
                    owner.setdefault(i, k)
        for k, qc in enumerate(concepts):
            qc.members = [i for i in qc.members if owner.get(i) == k]
            if not qc.members:
                raise UnknownClassError(
                    f"concept {qc.name}*: every class under it is asked for on its own or "
                    "under a smaller concept of the query; nothing is left to report as it"
                )
        out = list(plain.values()) + concepts
        names = [qc.name for qc in out]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise UnknownClassError(
                f"the query reports two classes under the same name {clashes}: ask for one of them by wnid, or drop one"
            )
        return ClassQuery(out, self.names, notes)


def resolve_query(
    terms: Sequence[str],
    names: Sequence[str],
    what: str = "the checkpoint's vocabulary",
    preferred: Sequence[int] | np.ndarray | None = None,
) -> ClassQuery:
    """Resolve query terms (see the module doc) over the class names ``names``; ``preferred``: the positions
    preferred when a word has several senses and the only members of concepts (the trained classes)."""
    return ClassResolver(names, preferred, what).resolve(terms)


def resolve_classes(
    classes: str | Sequence[str] | None, names: Sequence[str], what: str = "the checkpoint's vocabulary"
) -> np.ndarray | None:
    """Positions in ``names`` of the requested classes (sorted), concepts expanded to their members: None (all),
    a list of terms, a comma-separated string, or a file with one term per line (``class_terms``). An unknown
    term is an UnknownClassError that says it is not in ``what``."""
    wanted = class_terms(classes)
    return None if wanted is None else resolve_query(wanted, names, what).class_ids


def suggest(prefix: str, resolver: ClassResolver, limit: int = 20) -> list[dict]:
    """Autocompletion: class names and WordNet lemmas starting with ``prefix`` (normalised), shortest first,
    as they would resolve. Each item: ``text`` (what to type), ``class`` (the vocabulary's name, None for a
    concept), ``wnid``, ``gloss`` and ``classes`` (how many classes it scores: > 1 for a concept ``word*``).
    A word's other senses come as their wnids, so the page can offer them too."""
    key = normalize_name(prefix)
    if not key:
        return []
    words = {w for w in resolver.by_name if w.startswith(key)} | {w for w in resolver.wn.words() if w.startswith(key)}
    out: dict[str, dict] = {}

    def add(text: str, qc: QueryClass) -> None:
        out.setdefault(
            text,
            {
                "text": text,
                "class": None if qc.concept else resolver.names[qc.members[0]],
                "wnid": qc.wnid,
                "gloss": resolver.wn[qc.wnid].gloss if qc.wnid is not None and qc.wnid in resolver.wn else "",
                "classes": len(qc.members),
            },
        )

    for word in sorted(words, key=lambda w: (len(w), w)):
        if len(out) >= limit:
            break
        try:
            plain, _ = resolver.resolve_term(word)
        except UnknownClassError:
            continue
        add(word, plain)
        try:
            concept, _ = resolver.resolve_term(word + CONCEPT_MARK)
        except UnknownClassError:  # a wnid-named class of a custom vocabulary that WordNet lacks
            concept = plain
        if len(concept.members) > 1:
            add(word + CONCEPT_MARK, concept)
        for wnid in resolver.wn.senses(word):  # the other senses the vocabulary has, by wnid
            if wnid != plain.wnid and wnid in resolver.by_wnid:
                add(wnid, resolver.resolve_term(wnid)[0])
    return list(out.values())[:limit]
