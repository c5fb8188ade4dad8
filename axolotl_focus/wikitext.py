"""WikiText's tokenization markup, undone: :func:`detokenize`.

WikiText (Merity et al., 2016) is stored tokenized: every token is separated by a space, and a
hyphen, comma or point inside a number or compound is escaped as `` @-@ ``, `` @,@ `` and `` @.@ ``
("1 @,@ 000", "red @-@ tipped"). A model fine-tuned on that text learns the markup and loops on it
(`` @-@ @-@ ...``); a pretrained model has seen ordinary English. :func:`detokenize` turns a line
into ordinary text with these rules, applied in this order (the rules lm-evaluation-harness's
wikitext task uses, written here from their description; the PTB-only ``N`` rule is left out):

1. escapes: `` @-@ `` -> ``-``, `` @,@ `` -> ``,``, `` @.@ `` -> ``.``;
2. no space before ``, . ; : ! ? %`` and closing brackets, none after opening brackets;
3. clitics and possessives attach to the word before: `` 's``, `` 't``, `` n't``, `` 're``,
   `` 've``, `` 'll``, `` 'd``, `` 'm`` (any case) and the plural possessive ``s '`` -> ``s'``;
4. double quotes pair up left to right: ``" a b "`` -> ``"a b"`` (an unpaired last quote is left
   as it is);
5. heading marks ``= = x = =`` -> ``== x ==``; runs of spaces become one, the ends are stripped.

``<unk>`` (WikiText-2's rare-word token) is left to :func:`clean`, which also drops it: a model
fine-tuned on WikiText-2 learns to emit ``<unk>`` and loops on it (on the demo's valid split, 93% of
the CE-tuned SmolLM2 student's loops at top-p 0.9, T 0.7 were ``<unk> <unk> ...``), and the raw
WikiText that users train on has no such token. The rules are idempotent on their own output
(``detokenize(detokenize(x)) == detokenize(x)``, likewise :func:`clean`).
"""

from __future__ import annotations

import re

__all__ = ["clean", "detokenize"]

_ESCAPES = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_SPACE_BEFORE = re.compile(r" +([,.;:!?%)\]}])")
_SPACE_AFTER = re.compile(r"([(\[{]) +")
_CLITIC = re.compile(r" ('(?:s|t|re|ve|ll|d|m)\b|n't\b)", re.IGNORECASE)
_PLURAL_POSSESSIVE = re.compile(r"(\w)s ' ")
_HEADING = re.compile(r"(?:= )+=|=(?: =)+")
_SPACES = re.compile(r"\s+")
_UNK = re.compile(r"(?:^|\s)<unk>(?=\s|$)")
_EMPTY = re.compile(r'\(\s*\)|\[\s*\]|"\s*"')


def _pair_quotes(text: str) -> str:
    parts = text.split('"')
    if len(parts) < 3:
        return text
    out = [parts[0]]
    for i in range(1, len(parts) - 1, 2):  # parts[i] is inside the i-th pair of quotes
        out.append('"' + parts[i].strip() + '"' + parts[i + 1])
    if len(parts) % 2 == 0:  # an unpaired last quote
        out.append('"' + parts[-1])
    return "".join(out)


def detokenize(text: str) -> str:
    """``text`` (WikiText's tokenized form) as ordinary text (rules in the module docstring)."""
    for escaped, plain in _ESCAPES:
        text = text.replace(escaped, plain)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    text = _CLITIC.sub(r"\1", text)
    text = _PLURAL_POSSESSIVE.sub(r"\1s' ", text)
    text = _pair_quotes(text)
    text = _HEADING.sub(lambda m: m.group(0).replace(" ", ""), text)
    return _SPACES.sub(" ", text).strip()


def clean(text: str) -> str:
    """:func:`detokenize` with WikiText-2's ``<unk>`` tokens dropped (and the brackets or quotes they
    leave empty)."""
    text = _UNK.sub(" ", text)
    return detokenize(_EMPTY.sub(" ", detokenize(text)))
