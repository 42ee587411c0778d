"""The one exception type the CLI turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A mistake in the user's input (a file, a flag, a bundle): reported without a traceback."""
