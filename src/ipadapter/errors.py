"""One error type for user mistakes: the CLI prints its message as one line, without a traceback."""

from __future__ import annotations

from collections.abc import Mapping


class IPAdapterError(Exception):
    """A mistake in the user's input (file, flag, model combination) that a sentence can explain."""


class FieldError(IPAdapterError):
    """A bad value of named fields (a config's, a limit's), worded "<fields> <problem>". Whoever knows that a value
    came from a command-line flag words the error again with the flag (`worded`): the user reads what they typed."""

    def __init__(self, fields: str | tuple[str, ...], problem: str, owner: str = "") -> None:
        self.fields = (fields,) if isinstance(fields, str) else fields
        self.problem, self.owner = problem, owner
        super().__init__(self.worded({}))

    def worded(self, names: Mapping[str, str]) -> str:
        """The message with each field in `names` called by its name there (its flag), the others by the field's
        own (after `owner`, e.g. "the upload limit max_side"); several fields are a sum ("a + b must be <= 1")."""
        called = (names.get(field, f"{self.owner} {field}".lstrip()) for field in self.fields)
        return f"{' + '.join(called)} {self.problem}"


def first_clause(text: str, limit: int = 200) -> str:
    """The first line of a library's error, at most about `limit` characters: cut at a word boundary, marked "...",
    with the parentheses the cut left open closed, so the one-line message stays readable (theirs run to paragraphs)."""
    lines = str(text).strip().splitlines()
    line = lines[0].strip() if lines else ""
    if len(line) <= limit:
        return line
    head = line[: limit + 1]
    cut = head.rsplit(" ", 1)[0] if " " in head else line[:limit]
    cut = cut.rstrip(" ,;:(") + "..."
    return cut + ")" * max(0, cut.count("(") - cut.count(")"))
