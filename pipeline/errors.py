"""The one exception type that reaches the user as a one-line message instead of a traceback."""


class ImagemillError(Exception):
    """A problem the user can fix: the message names the file, the column or the setting, and the fix."""
