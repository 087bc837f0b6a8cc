"""Errors every stage shares. The CLI turns `InputError` into exit code 2 with its message."""


class InputError(ValueError):
    """Bad user input: unknown model or profile, malformed file, impossible layout.

    The message must say what is wrong and what to do about it, in one paragraph.
    """
