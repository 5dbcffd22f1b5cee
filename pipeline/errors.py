"""User-facing errors: one exception type whose message is printed as one clear line."""


class LangpruneError(Exception):
    """A problem with the user's input or environment, reported without a traceback.

    The CLI catches this type, prints ``error: <message>`` on one line and exits with
    status 2. Anything else is a bug and keeps its traceback.
    """
