"""The base of every error embedkit raises for bad input: the CLI prints these as one clear message, no traceback."""


class EmbedkitError(Exception):
    """Bad input or state that the user can fix; the message says what is wrong, where, and what to do."""


class DeviceError(EmbedkitError):
    """The device asked for is not there (``--device cuda`` where torch sees no CUDA device)."""
