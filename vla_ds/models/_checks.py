"""Value checks shared by the model config dataclasses (messages name owner.field)."""

from vla_ds.errors import ConfigError


def require_positive_int(owner: str, name: str, value: object) -> None:
    # bool is an int subclass; `True` as a layer count is a config mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{owner}.{name} must be a positive integer, got {value!r}")


def check_transformer(owner: str, d_model: int, num_heads: int, dropout: object) -> None:
    """Heads divide the width; dropout is a probability."""
    if d_model % num_heads != 0:
        raise ConfigError(f"{owner}.num_heads must divide d_model, got num_heads={num_heads}, d_model={d_model}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{owner}.dropout must be in [0, 1), got {dropout!r}")
