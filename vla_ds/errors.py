"""User-facing errors.

Every problem a user can fix (bad data, bad config, a missing checkpoint) is raised
as a :class:`VLAError` subclass whose message names the file or value at fault.
Entry points catch :class:`VLAError`, print its one-line message and exit non-zero,
so users never meet a traceback wall for their own mistakes.
"""


class VLAError(Exception):
    """Base class of errors that a user can act on; the message is shown as is."""


class ConfigError(VLAError):
    """A run configuration value (JSON, flag or --set) is missing, unknown or invalid."""


class DatasetError(VLAError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


class CheckpointError(VLAError):
    """A checkpoint is missing, incomplete or does not match the model."""


class BackboneError(VLAError):
    """The VL backbone directory or hub id cannot be loaded as a Qwen2.5-VL model."""
