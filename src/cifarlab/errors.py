"""Errors a user can cause and fix. CLIs print their message in one or two lines and exit with status 2."""


class CifarlabError(Exception):
    """A problem with the user's input or environment, not a bug in cifarlab."""


class DataError(CifarlabError):
    """The data source is missing, malformed or unreadable."""


class ConfigError(CifarlabError):
    """A configuration value is out of range or inconsistent with the data."""


class TrainingDiverged(CifarlabError):
    """The training loss became NaN or infinite."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch = epoch
        self.step = step
