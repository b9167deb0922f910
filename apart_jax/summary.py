"""TensorBoard scalar summaries written and read back without TensorFlow.

An event file is a sequence of TFRecords, each framing one serialized ``Event`` protobuf:

    uint64 length (little-endian) | masked CRC-32C of those 8 bytes | data | masked CRC-32C of data

The first event carries ``file_version = "brain.Event:2"``; each later one carries a
``Summary`` of ``(tag, simple_value)`` pairs at one step. The protobuf wire format is encoded
here by hand, so TensorBoard (``tensorboard --logdir=DIR``) reads these files and nothing
beyond the standard library is needed to write them.

    with SummaryWriter("runs/digits_apart/tb") as writer:
        writer.scalars({"clean_acc": 0.91, "pgd20_acc": 0.45}, step=230)
    read_scalars("runs/digits_apart/tb")  # {"clean_acc": [(230, 0.91...)], ...}
"""

from __future__ import annotations

import math
import operator
import os
import socket
import struct
import time
from collections.abc import Iterator, Mapping
from types import TracebackType
from typing import BinaryIO

FILE_VERSION = "brain.Event:2"

# Protobuf wire types.
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
# Field numbers: Event{wall_time 1, step 2, file_version 3, summary 5},
# Summary{value 1}, Summary.Value{tag 1, simple_value 2}.
_EVENT_WALL_TIME, _EVENT_STEP, _EVENT_FILE_VERSION, _EVENT_SUMMARY = 1, 2, 3, 5
_SUMMARY_VALUE, _VALUE_TAG, _VALUE_SIMPLE_VALUE = 1, 1, 2

_UINT32 = 0xFFFFFFFF
_UINT64 = 0xFFFFFFFFFFFFFFFF
_CRC32C_POLYNOMIAL = 0x82F63B78  # Castagnoli, bit-reversed.
_CRC_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> tuple[int, ...]:
    """The 256 CRC-32C remainders of each byte value, for byte-at-a-time updates."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC32C_POLYNOMIAL if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of ``data``: an int in [0, 2**32), 0xE3069283 for b"123456789"."""
    crc = _UINT32
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ _UINT32


def masked_crc32c(data: bytes) -> int:
    """The CRC-32C of ``data`` rotated right by 15 bits plus a constant, as TFRecord stores it."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & _UINT32


def frame_record(data: bytes) -> bytes:
    """``data`` framed as one TFRecord: 8-byte length, its masked CRC, data, data's masked CRC."""
    header = struct.pack("<Q", len(data))
    return (
        header
        + struct.pack("<I", masked_crc32c(header))
        + data
        + struct.pack("<I", masked_crc32c(data))
    )


def _varint(value: int) -> bytes:
    """``value`` in [0, 2**64) as a base-128 varint, low 7-bit group first."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _int64_field(field: int, value: int) -> bytes:
    """A signed 64-bit integer field; negative values take ten bytes (two's complement)."""
    return _key(field, _VARINT) + _varint(value & _UINT64)


def _bytes_field(field: int, value: bytes) -> bytes:
    """A length-delimited field: a string, bytes or an embedded message."""
    return _key(field, _BYTES) + _varint(len(value)) + value


def _double_field(field: int, value: float) -> bytes:
    return _key(field, _FIXED64) + struct.pack("<d", value)


def _float_field(field: int, value: float) -> bytes:
    """A float32 field: ``value`` rounded to nearest, beyond float32's range to +-inf."""
    try:
        packed = struct.pack("<f", value)
    except OverflowError:
        packed = struct.pack("<f", math.copysign(math.inf, value))
    return _key(field, _FIXED32) + packed


def encode_event(wall_time: float, step: int, payload: bytes) -> bytes:
    """A serialized ``Event``: wall time (seconds since the epoch), step, then ``payload``.

    ``payload`` is the encoded ``file_version`` or ``summary`` field
    (see :func:`file_version_event`, :func:`scalars_event`).
    """
    return _double_field(_EVENT_WALL_TIME, wall_time) + _int64_field(_EVENT_STEP, step) + payload


def file_version_event(wall_time: float) -> bytes:
    """The serialized ``Event`` that opens every event file (step 0)."""
    return encode_event(wall_time, 0, _bytes_field(_EVENT_FILE_VERSION, FILE_VERSION.encode()))


def scalars_event(wall_time: float, step: int, values: Mapping[str, float]) -> bytes:
    """A serialized ``Event`` whose ``Summary`` holds one ``simple_value`` per tag, in order."""
    summary = b"".join(
        _bytes_field(
            _SUMMARY_VALUE,
            _bytes_field(_VALUE_TAG, tag.encode()) + _float_field(_VALUE_SIMPLE_VALUE, value),
        )
        for tag, value in values.items()
    )
    return encode_event(wall_time, step, _bytes_field(_EVENT_SUMMARY, summary))


def _check_step(step: int) -> int:
    """``step`` (an int, NumPy integer or 0-d integer array) as an int in the int64 range."""
    try:
        step = operator.index(step)
    except TypeError:
        raise ValueError(f"step must be an integer, got {step!r}") from None
    if not -(2**63) <= step < 2**63:
        raise ValueError(f"step {step} is outside the int64 range")
    return step


def _check_values(values: Mapping[str, float]) -> dict[str, float]:
    """``values`` as ``{tag: float}``; raises ValueError for an empty tag or a non-number."""
    checked = {}
    for tag, value in values.items():
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"summary tags must be non-empty strings, got {tag!r}")
        try:
            if isinstance(value, (str, bytes)):
                raise TypeError
            checked[tag] = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"summary {tag!r} must be a number, got {value!r}") from None
    return checked


def _create_event_file(logdir: str) -> tuple[str, BinaryIO]:
    """Creates ``events.out.tfevents.{seconds}.{hostname}`` (a ``.N`` suffix if it exists)."""
    os.makedirs(logdir, exist_ok=True)
    base = os.path.join(logdir, f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}")
    path, n = base, 0
    while True:
        try:
            return path, open(path, "xb")
        except FileExistsError:
            n += 1
            path = f"{base}.{n}"


class SummaryWriter:
    """Writes scalars to a new TensorBoard event file in ``logdir`` (created if missing).

    Each :meth:`scalars` call writes one event and flushes it, so TensorBoard shows it at
    once; values are stored as float32. Use as a context manager, or call :meth:`close`.

    Attributes:
      path: the event file, ``logdir/events.out.tfevents.{int(time.time())}.{hostname}``.
    """

    def __init__(self, logdir: str | os.PathLike[str]):
        self.path, self._file = _create_event_file(os.fspath(logdir))
        self._write(file_version_event(time.time()))

    def _write(self, event: bytes) -> None:
        self._file.write(frame_record(event))
        self._file.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        """Writes ``value`` (any real number, e.g. a 0-d array) under ``tag`` at ``step``."""
        self.scalars({tag: value}, step)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        """Writes every ``{tag: value}`` pair at ``step`` as one event (none if empty)."""
        step, checked = _check_step(step), _check_values(values)
        if checked:
            self._write(scalars_event(time.time(), step, checked))

    def flush(self) -> None:
        """Pushes buffered events to the operating system."""
        self._file.flush()

    def close(self) -> None:
        """Flushes and closes the file; further writes raise ValueError. Safe to repeat."""
        self._file.close()

    def __enter__(self) -> SummaryWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def iter_records(data: bytes) -> Iterator[bytes]:
    """The payloads of the TFRecords in ``data``; raises ValueError on a truncated or bad CRC."""
    offset = 0
    while offset < len(data):
        if offset + 12 > len(data):
            raise ValueError(f"truncated record header at byte {offset}")
        header = data[offset : offset + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
        if header_crc != masked_crc32c(header):
            raise ValueError(f"length CRC mismatch in the record at byte {offset}")
        end = offset + 12 + length
        if end + 4 > len(data):
            raise ValueError(f"truncated record at byte {offset}")
        payload = data[offset + 12 : end]
        (payload_crc,) = struct.unpack("<I", data[end : end + 4])
        if payload_crc != masked_crc32c(payload):
            raise ValueError(f"data CRC mismatch in the record at byte {offset}")
        yield payload
        offset = end + 4


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """The varint at ``data[offset:]`` and the offset after it."""
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError("malformed protobuf varint")
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        offset += 1
        shift += 7
        if not byte & 0x80:
            return value, offset


def iter_fields(message: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """``(field number, wire type, value)`` of each field of a serialized protobuf message.

    Values: int for varints, bytes for length-delimited fields, the raw 8 or 4 bytes for
    fixed64 / fixed32 fields. Raises ValueError on malformed input or group wire types.
    """
    offset = 0
    while offset < len(message):
        key, offset = _read_varint(message, offset)
        field, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, offset = _read_varint(message, offset)
        elif wire_type in (_FIXED64, _FIXED32, _BYTES):
            if wire_type == _BYTES:
                size, offset = _read_varint(message, offset)
            else:
                size = 8 if wire_type == _FIXED64 else 4
            if offset + size > len(message):
                raise ValueError(f"protobuf field {field} runs past the end of its message")
            value, offset = message[offset : offset + size], offset + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire_type} in field {field}")
        yield field, wire_type, value


def decode_scalars(event: bytes) -> tuple[int, dict[str, float]]:
    """The step and ``{tag: simple_value}`` of a serialized ``Event`` (empty if it has none).

    Values without ``simple_value`` (e.g. TF2's tensor summaries) are skipped.
    """
    step, values = 0, {}
    for field, wire_type, value in iter_fields(event):
        if field == _EVENT_STEP and wire_type == _VARINT:
            step = value - 2**64 if value >= 2**63 else value
        elif field == _EVENT_SUMMARY and wire_type == _BYTES:
            for f, w, summary_value in iter_fields(value):
                if f == _SUMMARY_VALUE and w == _BYTES:
                    values.update(_decode_value(summary_value))
    return step, values


def _decode_value(message: bytes) -> dict[str, float]:
    """``{tag: simple_value}`` of a serialized ``Summary.Value``, or ``{}`` if it has no float."""
    tag, simple_value = "", None
    for field, wire_type, value in iter_fields(message):
        if field == _VALUE_TAG and wire_type == _BYTES:
            tag = value.decode()
        elif field == _VALUE_SIMPLE_VALUE and wire_type == _FIXED32:
            (simple_value,) = struct.unpack("<f", value)
    return {} if simple_value is None else {tag: simple_value}


def event_files(path_or_logdir: str | os.PathLike[str]) -> list[str]:
    """``[path]`` for a file; for a directory, its ``*tfevents*`` files sorted by name.

    Raises FileNotFoundError if the path is missing or the directory holds no event file.
    """
    path = os.fspath(path_or_logdir)
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found")
        return [path]
    files = sorted(
        os.path.join(path, name)
        for name in os.listdir(path)
        if "tfevents" in name and os.path.isfile(os.path.join(path, name))
    )
    if not files:
        raise FileNotFoundError(f"no event files (*tfevents*) in {path}")
    return files


def read_scalars(path_or_logdir: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of an event file, or of a directory's event files, in order written.

    Returns:
      ``{tag: [(step, value), ...]}``; values are the stored float32 numbers as Python floats.

    Raises:
      FileNotFoundError: no such file, or a directory without event files.
      ValueError: a truncated record, a CRC mismatch or a malformed event (names the file).
    """
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in event_files(path_or_logdir):
        with open(path, "rb") as f:
            data = f.read()
        try:
            for record in iter_records(data):
                step, values = decode_scalars(record)
                for tag, value in values.items():
                    scalars.setdefault(tag, []).append((step, value))
        except ValueError as error:  # UnicodeDecodeError included
            raise ValueError(f"{path}: {error}") from None
    return scalars
