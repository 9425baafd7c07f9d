"""User-facing errors: bad configs and bad data are reported, not crashed on."""


class HiertxError(Exception):
  """Base class of errors caused by user input, printed without a traceback."""


class ConfigError(HiertxError):
  """A config field has a value that cannot work; the message names the field."""

  def __init__(self, field: str, message: str):
    self.field = field
    super().__init__(f"config.{field}: {message}")


class DataError(HiertxError):
  """The data a config points at is missing, empty or unusable."""


class CheckpointError(HiertxError):
  """A workdir's checkpoints do not fit the run that wants to use them."""


class FlagError(HiertxError):
  """A command-line flag has a value that cannot work; the message names the flag."""

  def __init__(self, flag: str, message: str):
    self.flag = flag
    super().__init__(f"{flag}: {message}")
