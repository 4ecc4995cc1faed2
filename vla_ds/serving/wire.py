"""The wire format of openpi's websocket policy protocol: msgpack, with numpy arrays as maps.

An array travels as ``{"__ndarray__": True, "data": <bytes>, "dtype": "<f4", "shape": [H, D]}``
and a numpy scalar as ``{"__npgeneric__": True, "data": <value>, "dtype": "<f4"}`` (the
convention of ``openpi_client.msgpack_numpy``; its keys arrive as msgpack bytes, ours are
accepted as bytes or str). This module is our own reading of that convention: it never
falls back to pickle, accepts only plain numeric dtypes (bool, ints, floats), checks that
the buffer holds exactly ``prod(shape)`` items and refuses msgpack extension types, so a
message can carry numbers and strings and nothing that executes.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
import numpy as np

ARRAY_KEY, SCALAR_KEY = "__ndarray__", "__npgeneric__"
DTYPE_KINDS = "biuf"  # bool, signed, unsigned, float: everything else (objects, void, strings) is refused
MAX_NDIM = 8


class WireError(ValueError):
    """A message that is not a valid msgpack-numpy message; the text says what is wrong."""


def _pack_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in DTYPE_KINDS:
            raise WireError(f"cannot send an array of dtype {obj.dtype} (numbers only)")
        return {ARRAY_KEY.encode(): True, b"data": np.ascontiguousarray(obj).tobytes(),
                b"dtype": obj.dtype.str, b"shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in DTYPE_KINDS:
            raise WireError(f"cannot send a scalar of dtype {obj.dtype} (numbers only)")
        return {SCALAR_KEY.encode(): True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise WireError(f"cannot send a {type(obj).__name__} (msgpack types and numpy arrays only)")


def packb(obj: Any) -> bytes:
    """``obj`` (dicts, lists, str, numbers, numpy arrays and scalars) as one message."""
    return msgpack.packb(obj, default=_pack_default, use_bin_type=True)


def _get(d: dict, key: str) -> Any:
    return d[key.encode()] if key.encode() in d else d.get(key)


def _dtype(value: Any) -> np.dtype:
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if not isinstance(value, str):
        raise WireError(f"array dtype must be a string like '<f4', got {value!r}")
    try:
        dtype = np.dtype(value)
    except Exception:  # TypeError, and SyntaxError/ValueError from numpy's parser of comma strings
        raise WireError(f"unknown array dtype {value!r}") from None
    if dtype.kind not in DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise WireError(f"array dtype {value!r} is not allowed (bool, integer and float arrays only)")
    return dtype


def _object_hook(d: dict) -> Any:
    if _get(d, ARRAY_KEY) is True:
        dtype, shape, data = _dtype(_get(d, "dtype")), _get(d, "shape"), _get(d, "data")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise WireError(f"array shape must be a list of at most {MAX_NDIM} sizes >= 0, got {shape!r}")
        if not isinstance(data, bytes):
            raise WireError(f"array data must be bytes, got {type(data).__name__}")
        if len(data) != math.prod(shape) * dtype.itemsize:
            raise WireError(f"array data holds {len(data)} bytes, but shape {shape} of {dtype.str} needs "
                            f"{math.prod(shape) * dtype.itemsize}")
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    if _get(d, SCALAR_KEY) is True:
        dtype, value = _dtype(_get(d, "dtype")), _get(d, "data")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WireError(f"numpy scalar data must be a number, got {value!r}")
        try:
            return dtype.type(value)
        except (OverflowError, ValueError):
            raise WireError(f"numpy scalar {value!r} does not fit dtype {dtype.str}") from None
    return d


def _refuse_ext(code: int, data: bytes) -> Any:
    raise WireError(f"msgpack extension type {code} is not accepted")


def unpackb(data: bytes) -> Any:
    """One message back to Python objects and read-only numpy arrays; :class:`WireError`
    when ``data`` is not exactly one valid message."""
    try:
        return msgpack.unpackb(data, object_hook=_object_hook, ext_hook=_refuse_ext, raw=False)
    except WireError:
        raise
    except msgpack.ExtraData:
        raise WireError("not one msgpack message (bytes left over after the first object)") from None
    except Exception as e:  # whatever the bytes make msgpack or numpy raise is a bad message
        raise WireError(f"not a msgpack message ({type(e).__name__}: {e})") from None
