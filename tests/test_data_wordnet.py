"""The packaged WordNet 3.0 table: known facts, coverage of ImageNet-21K, and its regeneration from wordnet-base."""

from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path

import pytest

from larvseg.data.vocabulary import imagenet_synsets
from larvseg.data.wordnet import WORDNET_TABLE, is_wnid, wordnet

REPO = Path(__file__).resolve().parents[1]
WORDNET_DIR = Path("/usr/share/wordnet")


def test_known_facts():
    wn = wordnet()
    beagle, dog, animal, car, entity = "n02088364", "n02084071", "n00015388", "n02958343", "n00001740"
    assert wn[beagle].name == "beagle" and wn[dog].lemmas == ("dog", "domestic dog", "Canis familiaris")
    assert wn.is_a(beagle, dog) and wn.is_a(dog, animal) and wn.is_a(beagle, animal)
    assert not wn.is_a(dog, beagle) and not wn.is_a(car, animal)
    assert wn.senses("automobile") == [car] and wn.senses("Auto") == [car] and wn.senses("MotorCar") == [car]
    assert {"auto", "automobile", "motorcar"} <= {l.lower() for l in wn[car].lemmas}
    assert wn[car].gloss.startswith("a motor vehicle with four wheels")
    # crane: the machine (sense 4 of the word) before the bird (sense 5); the poets are not ImageNet classes
    assert wn.senses("crane") == ["n03126707", "n02012849"]
    assert wn.senses("dog")[0] == dog
    assert beagle in wn.descendants(dog) and dog in wn.descendants(dog) and animal not in wn.descendants(dog)
    assert len(wn.descendants(dog) & set(imagenet_synsets())) > 100  # the breeds
    assert entity in wn.ancestors(beagle) and wn[entity].parents == ()
    assert is_wnid("n02084071") and not is_wnid("n0208407") and not is_wnid("dog")


def test_every_imagenet21k_synset_and_its_ancestors_are_in_the_table():
    wn = wordnet()
    wnids = list(imagenet_synsets())
    assert len(wnids) == 21843
    assert [w for w in wnids if w not in wn] == []
    for w in wn.synsets.values():  # closed under is-a, every chain ends at entity
        assert all(p in wn for p in w.parents)
    assert all("n00001740" in wn.ancestors(w) for w in wnids[::500])
    assert WORDNET_TABLE.stat().st_size < 1_000_000  # small enough to ship in the package
    with gzip.open(WORDNET_TABLE, "rt") as f:
        head = f.read(4000)
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in head  # the licence travels with the data


@pytest.mark.skipif(
    not (WORDNET_DIR / "data.noun").is_file(),
    reason="WordNet 3.0 is not installed (apt-get install wordnet-base); the packaged table is used as is",
)
def test_table_regenerates_bit_for_bit(tmp_path):
    out = tmp_path / "table.tsv.gz"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_wordnet_table.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == WORDNET_TABLE.read_bytes()
