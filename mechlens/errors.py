"""Errors mechlens raises for bad input. Each message names the fix.

Only a :class:`MechlensError` means bad input or an unusable environment: the command line reports it
as one line and exit code 2. Any other exception is a bug in mechlens and shows its traceback.
"""


class MechlensError(Exception):
    """Base class: bad input or an environment problem, reported with what to do about it."""


class ConfigError(MechlensError, ValueError):
    """A study or command option out of its valid range; the message names the flag and the field."""

    def __init__(self, message: str, flag: str | None = None):
        super().__init__(message)
        self.flag = flag


class ModelNotAvailableError(MechlensError):
    """A model spec that cannot be loaded here (hub unreachable and not cached, missing or corrupt files)."""


class UnsupportedArchitectureError(MechlensError):
    """An architecture mechlens cannot analyse."""


class NotApplicableError(MechlensError):
    """A study that does not apply to a model's kind (e.g. a causal-only study on a masked LM)."""


class TokenError(MechlensError):
    """A target string that is not one token, or a token absent from the text."""


class DataError(MechlensError):
    """Too few texts, a text too short, an unreadable file, a hub dataset while offline."""


class NonFiniteError(MechlensError):
    """NaN or infinity in a model's weights, activations or a reported statistic."""


class OutputError(MechlensError):
    """An output directory mechlens must not write to (it would destroy data it did not write)."""
