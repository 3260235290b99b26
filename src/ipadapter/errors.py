"""One error type for user mistakes: the CLI prints its message as one line, without a traceback."""


class IPAdapterError(Exception):
    """A mistake in the user's input (file, flag, model combination) that a sentence can explain."""
