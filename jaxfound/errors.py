"""The one exception type users see: it names the file, line or key and what would be valid."""


class JaxfoundError(Exception):
    """A problem the user can fix (config, data, checkpoint, graph, argument)."""
