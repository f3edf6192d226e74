"""Why a training run cannot start or go on, as the command line reports it."""

from __future__ import annotations


class DataError(Exception):
    """The dataset cannot be used as given: missing, malformed, or too little of it. Not a configuration
    error (the settings are valid), but no retry with the same input can succeed either: the command
    exits 2 like an invalid configuration, which the training Job does not retry, and says it is the data."""
