"""Screening JSON text, at the speed of a byte copy, for what delivery could not carry.

Delivery reads every stored event with orjson and writes Klaviyo's requests with it, so an event
must not nest deeper than orjson writes (255 levels, Klaviyo's envelope included) nor hold a number
orjson refuses to read (one out of a double's range, such as ``1e999``: msgspec, which ingest reads
batches with, passes it through untouched inside the parts it does not decode). Answering either
question exactly takes a parse; ingest asks both of every request body, so :class:`Screened`
answers them with two passes over the bytes made in C (``bytes.translate``, then ``bytes.count``
and one regular expression with a literal prefix on what is left), about a third of a parse:

- the nesting depth exactly, for any JSON text (strings are taken out first, so brackets inside
  them do not count);
- whether a number may be out of range, as an over-approximation: False means none is; True means
  one may be (or a string holds text shaped like one), and the caller checks with a parser.

(One pass cannot serve both: strings must be empty for the brackets to be counted fast, and
strings must keep their letters for an ``e`` in a word not to read as an exponent.) Only a text
that fails the screen is looked at event by event (:mod:`router.intake`).
"""

from __future__ import annotations

import itertools
import re

#: Digits as ``0``, ``E`` as ``e``, what can end a number (whitespace) as ``,``; ``+`` as ``e`` too,
#: so that ``1e+999`` reads as ``0ee000,``, which holds the ``e000,`` of ``1e999`` (a ``+`` elsewhere
#: can only add matches, never hide one; deleting it instead took ``translate`` its slow path, twice
#: the time). Every other byte stays as it is: words keep an ``e`` apart from the digits after them
#: (``"AppleWebKit/537.36"``).
_NUMBER_SHAPES = bytes.maketrans(b"0123456789E \t\r\n+", b"0000000000e,,,,e")
#: A number out of a double's range: an exponent of three digits or more that ends a number (a
#: hexadecimal id such as ``"8e668f"`` does not end there), or a run of 200 digits (with an
#: exponent of two digits, 210 overflow).
_HUGE_EXPONENT = re.compile(rb"e000+[,\]}]")
_LONG_DIGITS = b"0" * 200
#: Deletes every byte but quotes and brackets.
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'"[]{}'))
#: Both kinds of brackets as one.
_ONE_KIND = bytes.maketrans(b"{}", b"[]")
#: An opening bracket as +1, a closing one as -1 (signed bytes).
_STEPS = bytes.maketrans(b"[]", b"\x01\xff")
_STRING = re.compile(rb'"[^"]*"')
#: Rounds of removing innermost bracket pairs before counting the rest one bracket at a time.
_QUICK_ROUNDS = 16


class Screened:
    """What the screen learns of one JSON text: its arrays and objects (as ``[`` and ``]``,
    strings taken out) and whether it may hold a number out of range. Meaningless for text that
    is not JSON."""

    def __init__(self, text: bytes) -> None:
        if b"\\" in text:  # escaped backslashes, then escaped quotes: what is left of strings is quoted
            text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
        shapes = text.translate(_NUMBER_SHAPES) + b","
        #: False when no number in the text can be out of a double's range.
        self.may_hold_huge_number = _HUGE_EXPONENT.search(shapes) is not None or _LONG_DIGITS in shapes
        skeleton = text.translate(None, _NOT_STRUCTURE)
        # Every string is an empty pair of quotes in the skeleton unless one holds a bracket: then
        # some quote has no neighbour to pair with, counting pairs from the left.
        brackets = skeleton.translate(_ONE_KIND, b'"')
        if len(skeleton) - len(brackets) == 2 * skeleton.count(b'""'):
            self.brackets = brackets
        else:  # take the strings out one by one
            self.brackets = _STRING.sub(b"", skeleton).translate(_ONE_KIND)

    def containers(self) -> int:
        """How many arrays and objects the text holds."""
        return self.brackets.count(b"[")

    def depth(self, limit: int | None = None) -> int:
        """How deeply arrays and objects nest (0 for a scalar, 1 for ``[1, 2]``).

        With ``limit``, counting may stop as soon as the depth is known to exceed it: the answer
        is then some number above ``limit``.
        """
        brackets = self.brackets
        # Each round removes the innermost pairs, so text of depth d is empty after d rounds.
        for depth in range(_QUICK_ROUNDS):
            if not brackets:
                return depth
            inner = brackets.replace(b"[]", b"")
            if len(inner) == len(brackets):  # not JSON: nothing left to pair
                break
            brackets = inner
        else:
            depth = _QUICK_ROUNDS
        deepest = depth
        for level in itertools.accumulate(memoryview(brackets.translate(_STEPS)).cast("b"), initial=depth):
            if level > deepest:
                deepest = level
                if limit is not None and deepest > limit:
                    break
        return deepest

    def nodes_at(self, level: int) -> int:
        """How many arrays and objects sit at ``level`` (1: the outermost, 2: inside it, ...).

        Linear in the number of brackets, at C speed, for texts nesting at most 255 levels.
        """
        try:
            levels = bytes(
                itertools.accumulate(memoryview(self.brackets.translate(_STEPS)).cast("b"), initial=0)
            )
        except ValueError:  # a level below 0 or above 255: not JSON, or too deep to count this way
            return self.containers()
        return levels.count(bytes((level - 1, level)))


def nesting_depth(text: bytes, limit: int | None = None) -> int:
    """How deeply arrays and objects nest in JSON ``text`` (see :meth:`Screened.depth`)."""
    return Screened(text).depth(limit)


def may_hold_huge_number(text: bytes) -> bool:
    """False when no number in JSON ``text`` can be out of a double's range (then parsers read it).

    True when one may be (or a string holds text shaped like one): parse to know.
    """
    return Screened(text).may_hold_huge_number
