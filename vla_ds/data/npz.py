"""Reading a sensor file's ``np.savez`` zip: its timestamps, and where and how its data is stored.

Two ways to the same answer. :func:`read_direct` reads the zip's central directory and local
headers itself, for the files ``np.savez`` writes (no zip64, ``data`` stored): a third of
``zipfile``'s time, most of a sensor file's share of building the dataset index. Anything
else, and any failure, goes through :func:`read_with_zipfile`, which names the problem in a
:class:`~vla_ds.errors.DatasetError`. No pickles are ever loaded.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from vla_ds.errors import DatasetError


def read_error(path: Path, member: str | None, exc: BaseException) -> str:
    """One-line message for an exception raised while reading ``path`` (``member`` inside it)."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    where = f"sensor file member '{member}'" if member else "sensor file"
    return f"{path}: cannot read {where} ({detail})"


# The header numpy writes for a plain array; anything else goes through numpy's own parser.
_NPY_HEADER = re.compile(r"\{'descr': '([<>|=]?[a-z]\d+)', 'fortran_order': (True|False), 'shape': \(((?:\d+, ?)*\d*)\), \}\s*")


def read_npy_header(fp, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy stream at ``fp``, which is left at the data.
    numpy's own reader evaluates the header with ``ast``: a tenth of a millisecond a file,
    a minute over a large dataset's sensor files, so the header numpy writes is matched here."""
    version = np.lib.format.read_magic(fp)
    if version not in ((1, 0), (2, 0)):
        raise DatasetError(f"{where}: unsupported .npy format version {version}")
    size = fp.read(2 if version == (1, 0) else 4)
    header = fp.read(int.from_bytes(size, "little"))
    match = _NPY_HEADER.fullmatch(header.decode("latin1"))
    if match:
        shape = tuple(int(v) for v in match.group(3).replace(" ", "").split(",") if v)
        return shape, match.group(2) == "True", np.dtype(match.group(1))
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(io.BytesIO(size + header))


def read_npy(fp, where: str) -> np.ndarray:
    """A small numeric .npy array from the stream ``fp`` (no pickles)."""
    return npy_from_bytes(fp.read(), where)


def npy_from_bytes(raw: bytes, where: str) -> np.ndarray:
    """The numeric .npy array a whole .npy file ``raw`` holds, as a view of it (no pickles)."""
    fp = io.BytesIO(raw)
    shape, fortran, dtype = read_npy_header(fp, where)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    count, start = int(np.prod(shape)), fp.tell()
    if len(raw) - start < count * dtype.itemsize:
        raise ValueError(f"the array ends after {len(raw) - start} of {count * dtype.itemsize} bytes")
    return np.frombuffer(raw, dtype, count, start).reshape(shape, order="F" if fortran else "C")


def _stamp(st: os.stat_result) -> str:
    return f"{st.st_size}:{st.st_mtime_ns}"


def read_with_zipfile(path: Path) -> tuple:
    """What :class:`~vla_ds.data.episodes.SensorData` reads of a sensor file, through ``zipfile``:
    (timestamps, data's shape, fortran order, dtype, .npy header length, data's file offset (0
    when compressed), member size, file size, compressed, stamp); any failure is a DatasetError
    naming the member."""
    member = None  # the zip member being read, for error messages
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            for key in ("timestamps", "data"):
                if key + ".npy" not in names:
                    found = sorted(n[:-4] for n in names if n.endswith(".npy"))
                    raise DatasetError(f"{path}: missing key '{key}' (found: {found})")
            member = "timestamps.npy"
            with zf.open(member) as f:
                ts = read_npy(f, f"{path}: sensor file member '{member}'")
            member = "data.npy"
            info = zf.getinfo(member)
            with zf.open(info) as f:
                shape, fortran, dtype = read_npy_header(f, f"{path}: sensor file member '{member}'")
                header_len = f.tell()
            member = None
            compressed = info.compress_type != zipfile.ZIP_STORED
            data_start = 0
            if not compressed:
                with open(path, "rb") as raw:
                    data_start = member_start(raw, info.header_offset)
                if data_start is None:
                    raise DatasetError(f"{path}: corrupt zip member 'data.npy'")
                data_start += header_len
            st = os.stat(path)
    except (DatasetError, MemoryError):
        raise
    except Exception as e:  # BadZipFile, zlib.error, OSError, ValueError, EOFError, ...: any decoding failure
        raise DatasetError(read_error(path, member, e)) from None
    return ts, shape, fortran, dtype, header_len, data_start, info.file_size, st.st_size, compressed, _stamp(st)


def member_start(f, header_offset: int) -> int | None:
    """Where the bytes of the zip member whose local header is at ``header_offset`` start: after
    that header (30 bytes, then name and extra field, whose lengths can differ from the central
    directory's); None when no local header is there."""
    f.seek(header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        return None
    return header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")


_CENTRAL = struct.Struct("<4s6H3I5H2I")  # a zip central directory entry (46 bytes)


def read_direct(path: Path) -> tuple | None:
    """:func:`read_with_zipfile`'s answer read straight from the zip's central directory, for the
    files ``np.savez`` writes (no zip64, ``data`` stored, ``timestamps`` stored or deflated): a
    third of the time. None for anything else, and for any failure (then :func:`read_with_zipfile`
    reads it and names the problem)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            tail = min(size, 22 + 512)
            f.seek(size - tail)
            buf = f.read(tail)
            end = buf.rfind(b"PK\x05\x06")
            if end < 0 or len(buf) - end < 22:
                return None
            disk, cd_disk, n_here, n, cd_size, cd_off, _ = struct.unpack_from("<4H2IH", buf, end + 4)
            if disk or cd_disk or n_here != n or n == 0xFFFF or cd_off == 0xFFFFFFFF or cd_size > 1 << 20:
                return None
            f.seek(cd_off)
            cd = f.read(cd_size)
            members, pos = {}, 0
            for _ in range(n):
                (sig, _, _, flags, method, _, _, crc, csize, usize, name_len, extra_len, comment_len, _, _, _,
                 offset) = _CENTRAL.unpack_from(cd, pos)
                if sig != b"PK\x01\x02" or flags & 1 or 0xFFFFFFFF in (csize, usize, offset):
                    return None
                name = cd[pos + 46:pos + 46 + name_len].decode("utf-8", "replace")
                members[name] = (method, crc, csize, usize, offset)
                pos += 46 + name_len + extra_len + comment_len
            method, crc, csize, usize, offset = members["timestamps.npy"]
            ts_at = member_start(f, offset)
            if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) or ts_at is None:
                return None
            f.seek(ts_at)
            raw = f.read(csize)
            if method == zipfile.ZIP_DEFLATED:
                raw = zlib.decompress(raw, -15)
            if len(raw) != usize or zlib.crc32(raw) != crc:
                return None
            ts = npy_from_bytes(raw, f"{path}: sensor file member 'timestamps.npy'")
            method, _, _, usize, offset = members["data.npy"]
            data_at = member_start(f, offset)
            if method != zipfile.ZIP_STORED or data_at is None:
                return None
            f.seek(data_at)
            shape, fortran, dtype = read_npy_header(f, f"{path}: sensor file member 'data.npy'")
            header_len = f.tell() - data_at
    except Exception:  # noqa: BLE001 (a reason to read it the careful way, not an error yet)
        return None
    return ts, shape, fortran, dtype, header_len, data_at + header_len, usize, size, False, _stamp(st)
