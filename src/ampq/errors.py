"""ampq's one error type: a one-line message that names the problem and the fix."""


class AmpqError(Exception):
    """Raised for every problem a user can fix (bad input, bad file, impossible request)."""
