"""One error type for user mistakes: the CLI prints its message as one line, without a traceback."""


class IPAdapterError(Exception):
    """A mistake in the user's input (file, flag, model combination) that a sentence can explain."""


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
