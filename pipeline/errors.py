"""The one exception type the command line turns into a clean error message and a non-zero exit."""


class LayerMoEError(Exception):
    """A problem with the user's input or environment, with a message that names it."""
