"""The one base class of errors caused by user input; the CLI prints these without a traceback."""


class RlboothError(Exception):
    """Bad input or state that the user can fix; the message names the file or field and the fix."""
