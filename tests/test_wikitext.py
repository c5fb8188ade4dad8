"""WikiText's markup undone (axolotl_focus/wikitext.py): each rule on a hand-written line, and the
whole embedded slice (no markup left, idempotent, words kept)."""

import re

import pytest

from axolotl_focus.micro import corpus_documents
from axolotl_focus.wikitext import clean, detokenize


@pytest.mark.parametrize("raw,clean", [
    ("weigh 0 @.@ 7 – 2 @.@ 2 kg", "weigh 0.7 – 2.2 kg"),  # rule 1: escapes
    ("1 @,@ 000 men and a red @-@ tipped claw", "1,000 men and a red-tipped claw"),
    ("In life , the lobsters are blue .", "In life, the lobsters are blue."),  # rule 2: punctuation
    ("up to 60 cm ( 24 in ) and 5 % ; then : done !", "up to 60 cm (24 in) and 5%; then: done!"),
    ("the [ 1 ] note", "the [1] note"),
    ("the band 's album , it 's and don 't , we 're they 've I 'll he 'd I 'm", "the band's album, it's and "
     "don't, we're they've I'll he'd I'm"),  # rule 3: clitics
    ("the players ' union", "the players' union"),
    ('only becoming " lobster red " on cooking', 'only becoming "lobster red" on cooking'),  # rule 4: quotes
    ('" a " and " b "', '"a" and "b"'),
    ('a " lone quote', 'a " lone quote'),
    (" = = Life cycle = = ", "== Life cycle =="),  # rule 5: headings, spaces
    ("a   <unk>  lobster ", "a <unk> lobster"),  # <unk> is text
])
def test_each_rule(raw, clean):
    assert detokenize(raw) == clean


def test_the_embedded_slice_has_no_markup_left_and_keeps_its_words():
    for split in ("valid", "test"):
        for doc in corpus_documents(split):
            clean = detokenize(doc)
            assert detokenize(clean) == clean  # idempotent
            assert not re.search(r" @[-,.]@ | [,.;:!?%)] | 's\b", " " + clean + " ")
            words = lambda t: re.sub(r"[^\w<>]", "", t)  # noqa: E731 - only spacing and escapes change
            assert words(clean) == words(doc.replace("@-@", "").replace("@,@", "").replace("@.@", ""))


def test_clean_also_drops_unk_and_what_it_leaves_empty():
    raw = 'a large <unk> , with a body ( <unk> ) , " <unk> " said <unk> <unk> . <unk>'
    assert clean(raw) == "a large, with a body, said."
    assert clean("no rare words here .") == detokenize("no rare words here .")
    docs = corpus_documents("valid", clean=True)
    assert docs and not any("<unk>" in d for d in docs)
    assert all(clean(d) == d for d in docs[:200])  # idempotent
