"""ampq's one error type: a one-line message that names the problem and the fix."""


class AmpqError(Exception):
    """Raised for every problem a user can fix (bad input, bad file, impossible request)."""


def first_line(e: BaseException) -> str:
    """An exception's message on one line, at most 200 characters, for an AmpqError that quotes it."""
    text = " ".join(str(e).split())
    return (text or type(e).__name__)[:200]
