"""One exception type for every mistake a user can make.

The CLI turns a `UserError` into a one-line message and exit code 2. Everything is validated before it
reaches llama.cpp, because some of llama.cpp's failures abort the whole process.
"""


class UserError(Exception):
    """Bad input from the user: a missing file, a malformed dataset, an adapter that does not fit."""
