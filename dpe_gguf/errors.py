"""The one exception type for user-facing errors."""


class DPEError(Exception):
    """A problem the user can fix (bad file, bad parameter, bad destination).

    The message names the file or the option and says what to do; the CLI prints it as
    ``dpe-gguf: error: <message>`` and exits with code 2.
    """
