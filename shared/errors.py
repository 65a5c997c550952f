"""Errors that are the user's to fix (a bad path, config or file). The entry point prints them as one readable
message instead of a traceback; everything else is a bug and keeps its traceback."""


class UserError(Exception):
    pass


class ConfigError(UserError):
    """An impossible or inconsistent configuration, found at start-up."""


class DataError(UserError):
    """Missing, empty or inconsistent data (image roots, shards, latent caches, checkpoints)."""


def one_line(error: UserError) -> str:
    """How every entry point reports a user error: one line, naming its kind."""
    return f"error ({type(error).__name__}): {error}"
