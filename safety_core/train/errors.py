"""The one error type for unusable data, shared by the readers, filters and templates."""


class DataError(ValueError):
    """A record that cannot be used; the message names its file (or dataset) and line."""
