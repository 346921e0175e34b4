"""Errors that reach the user as one line on stderr (see cli.main)."""


class CpslError(Exception):
    """Base class: the message names the file, key or value at fault."""


class ConfigError(CpslError):
    """A bad or missing setting; the message starts with the key's dotted path."""


class DataError(CpslError):
    """A bad input file or dataset root; the message names the file."""


class CheckpointError(CpslError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""
