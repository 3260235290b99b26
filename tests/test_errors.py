"""`first_clause`, which shortens a library's error to the one line a user reads: its cut, written out by hand from
the definition (the longest run of whole words of at most `limit` characters, "..." after it, open parentheses
closed)."""

from __future__ import annotations

import pytest

from ipadapter.errors import first_clause


@pytest.mark.parametrize(("text", "expected"), [
    ("", ""),
    ("\n  \n", ""),
    ("  the first line  \nthe second line", "the first line"),
    (ValueError("an exception\nwith details"), "an exception"),
])
def test_the_first_line_stripped(text, expected) -> None:
    assert first_clause(text) == expected


@pytest.mark.parametrize(("text", "limit", "expected"), [
    ("abcd efgh", 9, "abcd efgh"),  # exactly the limit: kept whole
    ("aaaa bbbb cccc", 9, "aaaa bbbb..."),  # a word ending at the limit is kept
    ("aaaa bbbbb cccc", 9, "aaaa..."),  # one ending a character after it is not
    ("aaaa  bbbb cccc", 10, "aaaa  bbbb..."),  # only the last space splits
    ("xxxxxxxxxxxx", 10, "xxxxxxxxxx..."),  # no space at all: cut at the limit
    ("alpha BOX, gamma delta", 15, "alpha BOX..."),  # punctuation before the cut goes, the word stays
    ("load (model one two three", 15, "load (model one...)"),
    ("f(a) g(b c d e", 9, "f(a) g(b...)"),  # only the parentheses left open are closed
])
def test_a_long_line_is_cut_after_a_whole_word(text, limit, expected) -> None:
    assert first_clause(text, limit) == expected


def test_the_default_limit_is_200_characters() -> None:
    line = "w " * 150  # "w w w ...": a word ends at every even length
    assert first_clause(line) == line[:199] + "..."
    assert first_clause(line[:200]) == line[:199]  # 199 characters once stripped: not cut
