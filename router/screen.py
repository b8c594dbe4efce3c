"""Screening JSON text, at the speed of a byte copy, for what delivery could not carry.

Delivery reads every stored event with orjson and writes Klaviyo's requests with it, so an event
must not nest deeper than orjson writes (255 levels, Klaviyo's envelope included) nor hold a number
orjson refuses to read (one out of a double's range, such as ``1e999``: msgspec, which ingest reads
batches with, passes it through untouched inside the parts it does not decode). Answering either
question exactly takes a parse; ingest asks both of every request body, so they are first answered
with passes over the bytes made in C (``bytes.translate``, ``bytes.replace``, substring search):

- :func:`nesting_depth` exactly, for any JSON text (strings are taken out first, so brackets
  inside them do not count);
- :func:`may_hold_huge_number` as an over-approximation: False means no number in the text is out
  of range; True means one may be, and the caller checks with a parser.

Only a text that fails the screen is looked at event by event (:mod:`router.intake`).
"""

from __future__ import annotations

import itertools
import re

#: Deletes every byte but quotes and brackets.
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'"[]{}'))
#: Both kinds of brackets as one.
_ONE_KIND = bytes.maketrans(b"{}", b"[]")
#: An opening bracket as +1, a closing one as -1 (signed bytes).
_STEPS = bytes.maketrans(b"[]", b"\x01\xff")
_STRING = re.compile(rb'"[^"]*"')
#: Rounds of removing innermost bracket pairs before counting the rest one bracket at a time.
_QUICK_ROUNDS = 16


class Brackets:
    """The arrays and objects of a JSON text, as ``[`` and ``]`` (strings taken out, so brackets
    inside them do not count). Meaningless for text that is not JSON."""

    def __init__(self, text: bytes) -> None:
        if b"\\" in text:  # escaped backslashes, then escaped quotes: what is left of strings is quoted
            text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
        skeleton = text.translate(None, _NOT_STRUCTURE)
        # Every string is an empty pair of quotes in the skeleton unless one holds a bracket: then
        # some quote has no neighbour to pair with, counting pairs from the left.
        if skeleton.count(b'"') == 2 * skeleton.count(b'""'):
            brackets = skeleton.translate(_ONE_KIND, b'"')
        else:  # take the strings out one by one
            brackets = _STRING.sub(b"", skeleton).translate(_ONE_KIND)
        self.brackets = brackets

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
    """How deeply arrays and objects nest in JSON ``text`` (see :meth:`Brackets.depth`)."""
    return Brackets(text).depth(limit)


#: Maps digits to ``0``, ``E`` to ``e`` and what can end a number (``]``, ``}``, whitespace) to
#: ``,``; deletes ``+`` (so that ``1e+999`` reads as ``0e000,`` like ``1e999``) and every letter
#: but ``e``, leaving a shorter text to search (``"8e668f"`` reads as ``"0e000"``).
_NUMBER_SHAPES = bytes.maketrans(b"0123456789E]} \t\r\n", b"0000000000e,,,,,,")
_NOT_IN_SHAPES = b"+" + bytes(set(b"ABCDFGHIJKLMNOPQRSTUVWXYZabcdfghijklmnopqrstuvwxyz"))
#: A number out of a double's range: an exponent of three digits or more that ends a number (a
#: hexadecimal id such as ``"8e668f"`` does not end there), or a run of 200 digits (with an
#: exponent of two digits, 210 overflow).
_HUGE_EXPONENT = re.compile(rb"e000+,")
_LONG_DIGITS = b"0" * 200


def may_hold_huge_number(text: bytes) -> bool:
    """False when no number in JSON ``text`` can be out of a double's range (then parsers read it).

    True when one may be (or a string holds text shaped like one): parse to know.
    """
    shapes = text.translate(_NUMBER_SHAPES, _NOT_IN_SHAPES) + b","
    return _HUGE_EXPONENT.search(shapes) is not None or _LONG_DIGITS in shapes
