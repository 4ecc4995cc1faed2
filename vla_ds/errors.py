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


class TrainingError(VLAError):
    """Training cannot go on (e.g. the loss stays non-finite); the message says what was kept."""


class BackboneError(VLAError):
    """The VL backbone directory or hub id cannot be loaded as a Qwen2.5-VL model."""


def user_message(exc: VLAError) -> str:
    """The one line to show for ``exc``.

    An error raised inside a DataLoader worker comes back re-raised by torch with the
    worker's whole traceback in its message; the user needs only the original line.
    """
    text = str(exc)
    if "\nOriginal Traceback" in text:
        last = [line for line in text.splitlines() if line.strip()][-1]
        prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last.split(": ", 1)[-1]
    return text


def run_command(fn, args):
    """``(0, fn(args))``, or ``(2, None)`` after printing a :class:`VLAError` as one ``error:``
    line on stderr: the convention of every vla_ds command line."""
    import sys

    try:
        return 0, fn(args)
    except VLAError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2, None
