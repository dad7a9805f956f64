"""Errors mechlens raises for bad input. Each message names the fix."""


class MechlensError(Exception):
    """Base class: bad input or an environment problem, reported with what to do about it."""


class ModelNotAvailableError(MechlensError):
    """A model spec that cannot be loaded here (hub unreachable and not cached, missing files)."""


class UnsupportedArchitectureError(MechlensError):
    """An architecture mechlens cannot analyse."""


class TokenError(MechlensError):
    """A target string that is not one token, or a token absent from the text."""


class DataError(MechlensError):
    """Too few texts, a text too short, an unreadable file, a hub dataset while offline."""
