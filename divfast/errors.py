"""User-facing errors: one line that names the argument and what was expected.

The CLI prints these without a traceback and exits non-zero; library callers can catch them as
ValueError.
"""


class DivfastError(ValueError):
    """Bad input from the user (a file, a spec, an option)."""
