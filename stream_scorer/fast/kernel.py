"""Fast path, part two: the compiled interpreter of ``fast.plan`` programs.

One function, ``run_batch``, decodes a whole batch of records (their bytes concatenated) and
writes the feature matrix, a cell state per feature, a decode status per record and the id
and event time of each. It is compiled once by numba (cached: later processes load the
machine code from the cache directory instead of compiling again) and serves every schema,
because the schema is data (the program), not code.

Guards, each a decode status (``REASONS``), with the semantics of ``avro_guard``:
values that are null, empty or larger than the limit; input ending early (``truncated``: also
a length or block byte size longer than the bytes left); varints longer than 10 bytes; an
``int`` (or enum index) outside 32 bits or a long outside 64 (``int_out_of_range``); negative
lengths and block byte sizes; enum and union indexes outside the schema; array and map blocks
announcing more items than the bytes left can hold (count times the item's smallest encoding),
or, for items that take no bytes, more than ``MAX_EMPTY_ITEMS`` in the whole record
(``count_too_large``); invalid UTF-8 (the rules of Python's strict decoder); bytes left over
after the record; ``malformed_avro``: a boolean byte other than 0 or 1, block items that do not
fill their announced byte size exactly, logical-type values fastavro cannot convert.

numba's cache folder and what happens when it cannot be written: ``fast.cache`` (by default
``$NUMBA_CACHE_DIR``; unwritable: compiled in memory, one warning). numba keys its cache on this
file and the functions' bytecode, not on the constants they read from other modules (the
decode statuses from ``Reason``, the operations and states of ``fast.plan``): importing this
module compares a fingerprint of those constants with the one compiled into the cache and,
when they differ, compiles afresh (``_refresh_stale_cache``).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import numba
import numba.core.caching
import numpy as np
import numpy.typing as npt

from stream_scorer.fast import cache as jitcache
from stream_scorer.fast import plan as fp
from stream_scorer.stages.avro_guard import DEFAULT_MAX_ZERO_SIZE_ITEMS
from stream_scorer.stages.records import DECODE_REASONS, Reason

log = logging.getLogger(__name__)
_F = TypeVar("_F", bound=Callable[..., Any])

#: Whether the compiled functions are cached on disk (False: compiled in memory by each process).
CACHED = jitcache.prepare(
    __file__,
    numba.core.caching.UserProvidedCacheLocator.get_suitable_cache_subpath(__file__),  # type: ignore[no-untyped-call]
)


def _njit(**options: Any) -> Callable[[_F], _F]:
    """``numba.njit`` with ``cache=CACHED``; compiles in memory when numba finds no cache folder."""

    def decorate(func: _F) -> _F:
        global CACHED
        if CACHED:
            try:
                return numba.njit(cache=True, **options)(func)  # type: ignore[no-any-return]
            except RuntimeError as exc:  # "cannot cache function ...: no locator available"
                log.warning("%s: the fast path's kernel is compiled in memory at every start", exc)
                CACHED = False
        return numba.njit(cache=False, **options)(func)  # type: ignore[no-any-return]

    return decorate


#: Decode statuses: 0 is success, status ``s`` is the dead-letter reason ``REASONS[s]``: the
#: decode stage's ``Reason`` members, in their order. The constants below are their indexes.
REASONS: tuple[Reason | None, ...] = (None, *DECODE_REASONS)
OK = 0
NULL = REASONS.index(Reason.NULL_VALUE)
EMPTY = REASONS.index(Reason.EMPTY)
TOO_LARGE = REASONS.index(Reason.TOO_LARGE)
TRUNCATED = REASONS.index(Reason.TRUNCATED)
VARINT = REASONS.index(Reason.VARINT_TOO_LONG)
INT_RANGE = REASONS.index(Reason.INT_OUT_OF_RANGE)
NEG_LEN = REASONS.index(Reason.NEGATIVE_LENGTH)
BAD_ENUM = REASONS.index(Reason.BAD_ENUM_INDEX)
BAD_UNION = REASONS.index(Reason.BAD_UNION_INDEX)
COUNT = REASONS.index(Reason.COUNT_TOO_LARGE)
UTF8 = REASONS.index(Reason.INVALID_UTF8)
TRAILING = REASONS.index(Reason.TRAILING_BYTES)
MALFORMED = REASONS.index(Reason.MALFORMED_AVRO)

#: At most this many items of types that take no bytes (e.g. ``null``) in one record.
MAX_EMPTY_ITEMS = DEFAULT_MAX_ZERO_SIZE_ITEMS

_MS_MIN = -62_135_596_800_000  # 0001-01-01T00:00:00Z
_MS_MAX = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
_DAY_MIN = -719_162  # date.fromordinal(1) - 1970-01-01
_DAY_MAX = 2_932_896  # date(9999, 12, 31) - 1970-01-01
_MS_HOUR = 3_600_000
_MS_DAY = 86_400_000
_F32_MAX = float(np.finfo(np.float32).max)

Int64s = npt.NDArray[np.int64]


@_njit(inline="always")
def _varint(buf: npt.NDArray[np.uint8], pos: int, end: int) -> tuple[int, int, int]:
    """Read a zigzag varint: (value, new position, status)."""
    acc = np.uint64(0)
    shift = np.uint64(0)
    for i in range(10):
        if pos >= end:
            return 0, pos, TRUNCATED
        b = buf[pos]
        pos += 1
        if i == 9:
            if b & 0x80:
                return 0, pos, VARINT
            if b > 1:
                return 0, pos, INT_RANGE
        acc |= np.uint64(b & 0x7F) << shift
        if not b & 0x80:
            half = np.int64(acc >> np.uint64(1))
            if acc & np.uint64(1):
                return int(-half - 1), pos, OK
            return int(half), pos, OK
        shift += np.uint64(7)
    return 0, pos, VARINT  # pragma: no cover - the loop returns on its tenth byte


@_njit(inline="always")
def _utf8(buf: npt.NDArray[np.uint8], pos: int, end: int) -> tuple[bool, int]:
    """Validate UTF-8 as Python's strict decoder does: (valid, code points)."""
    chars = 0
    while pos < end:
        b = buf[pos]
        chars += 1
        if b < 0x80:
            pos += 1
            continue
        if 0xC2 <= b <= 0xDF:
            need, lo, hi = 1, 0x80, 0xBF
        elif b == 0xE0:
            need, lo, hi = 2, 0xA0, 0xBF
        elif 0xE1 <= b <= 0xEC or 0xEE <= b <= 0xEF:
            need, lo, hi = 2, 0x80, 0xBF
        elif b == 0xED:
            need, lo, hi = 2, 0x80, 0x9F
        elif b == 0xF0:
            need, lo, hi = 3, 0x90, 0xBF
        elif 0xF1 <= b <= 0xF3:
            need, lo, hi = 3, 0x80, 0xBF
        elif b == 0xF4:
            need, lo, hi = 3, 0x80, 0x8F
        else:
            return False, chars
        if pos + need >= end:  # the sequence runs past the string
            return False, chars
        c = buf[pos + 1]
        if c < lo or c > hi:
            return False, chars
        for k in range(2, need + 1):
            c = buf[pos + k]
            if c < 0x80 or c > 0xBF:
                return False, chars
        pos += need + 1
    return True, chars


@_njit(inline="always")
def _check(value: int, check: int) -> bool:
    """Whether fastavro can convert ``value`` of a logical type (see ``fast.plan.CHECK_*``)."""
    if check == fp.CHECK_TS_MILLIS:
        return _MS_MIN <= value <= _MS_MAX
    if check == fp.CHECK_TS_MICROS:
        return _MS_MIN * 1000 <= value <= _MS_MAX * 1000 + 999
    if check == fp.CHECK_DATE:
        return _DAY_MIN <= value <= _DAY_MAX
    if check == fp.CHECK_TIME_MILLIS:
        return -_MS_HOUR < value < _MS_DAY
    if check == fp.CHECK_TIME_MICROS:
        return -_MS_HOUR * 1000 < value < _MS_DAY * 1000
    return True


@_njit(inline="always")
def _blocks(
    buf: npt.NDArray[np.uint8], pos: int, end: int, item_min: int, zero_left: int
) -> tuple[int, int, int, int, int]:
    """Read an array/map block header.

    Returns (count, position, block end or -1, zero-byte items still allowed, status).
    """
    count, pos, err = _varint(buf, pos, end)
    if err != OK:
        return 0, pos, -1, zero_left, err
    block_end = -1
    if count < 0:
        if count == -9_223_372_036_854_775_807 - 1:
            return 0, pos, -1, zero_left, COUNT
        count = -count
        size, pos, err = _varint(buf, pos, end)
        if err != OK:
            return 0, pos, -1, zero_left, err
        if size < 0:
            return 0, pos, -1, zero_left, NEG_LEN
        if size > end - pos:
            return 0, pos, -1, zero_left, TRUNCATED
        block_end = pos + size
    if count == 0:
        return 0, pos, -1, zero_left, OK
    if item_min > 0:
        if count > (end - pos) // item_min:
            return 0, pos, -1, zero_left, COUNT
    else:
        zero_left -= count
        if zero_left < 0:
            return 0, pos, -1, zero_left, COUNT
    return count, pos, block_end, zero_left, OK


@_njit()
def run_batch(
    buf: npt.NDArray[np.uint8],
    starts: Int64s,
    lens: Int64s,
    max_bytes: int,
    code: npt.NDArray[np.int64],
    branches: Int64s,
    enum_lut: Int64s,
    cat_bytes: npt.NDArray[np.uint8],
    cat_spans: npt.NDArray[np.int64],
    depth: int,
    lo_float: npt.NDArray[np.float64],
    hi_float: npt.NDArray[np.float64],
    lo_int: Int64s,
    hi_int: Int64s,
    matrix: npt.NDArray[np.float32],
    state: npt.NDArray[np.uint8],
    raw_float: npt.NDArray[np.float64],
    raw_int: npt.NDArray[np.int64],
    status: Int64s,
    err_at: Int64s,
    ids: npt.NDArray[np.int64],
    id_float: npt.NDArray[np.float64],
    times: Int64s,
) -> int:
    """Decode every record of a batch; return how many decoded.

    Args:
        buf: the records' bytes, concatenated.
        starts: where each record starts in ``buf``.
        lens: each record's length; -1 for a null value.
        max_bytes: longer records are ``too_large``.
        code: the program (``fast.plan.Program``) and its tables (the next five arguments).
        branches: union branch start pcs.
        enum_lut: enum symbol to category position.
        cat_bytes: string categories, concatenated.
        cat_spans: start and length of each string category.
        depth: array/map nesting of the program.
        lo_float: per column, the smallest valid float or double (``-inf``: no bound).
        hi_float: per column, the largest valid float or double (``inf``: no bound).
        lo_int: per column, the smallest valid integer; above ``hi_int``: none is valid.
        hi_int: per column, the largest valid integer.
        matrix: out: the feature matrix (NaN where no value).
        state: out: each cell's ``fast.plan`` state; bounds and float32's range are checked on
            the value as read (the double, or the exact integer), before it becomes float32.
        raw_float: out: the double read, where a cell is *inf* or *out of range* (a float);
            where a cell is *unseen*: the string's length, -1 for an enum symbol, -2 for a
            value of another type.
        raw_int: out: the integer read, where a cell is *out of range* (an int or boolean);
            where a cell is *unseen*: where the string starts in ``buf``, or the enum symbol's
            position in ``enum_lut``.
        status: out: each record's status (index into ``REASONS``).
        err_at: out: the byte offset in the record where decoding failed.
        ids: out: ``(n, 6)``: id kind, integer value, span start, span length, code points,
            enum table.
        id_float: out: the id's value when it is a float or double.
        times: out: ``(n, 2)``: 1 when the record has an event time, and the time in ms.
    """
    n = starts.shape[0]
    n_cols = matrix.shape[1]
    stack_left = np.zeros(depth + 1, dtype=np.int64)
    stack_end = np.zeros(depth + 1, dtype=np.int64)
    f4 = np.zeros(1, dtype=np.float32)
    u4 = f4.view(np.uint32)
    f8 = np.zeros(1, dtype=np.float64)
    u8 = f8.view(np.uint64)
    nan32 = np.float32(np.nan)
    good = 0
    for r in range(n):
        for j in range(n_cols):
            matrix[r, j] = nan32
            state[r, j] = fp.MISSING
        ids[r, 0] = fp.ID_NULL
        times[r, 0] = 0
        err_at[r] = 0
        size = lens[r]
        if size < 0:
            status[r] = NULL
            continue
        if size == 0:
            status[r] = EMPTY
            continue
        if size > max_bytes:
            status[r] = TOO_LARGE
            continue
        begin = starts[r]
        pos = begin
        end = begin + size
        err = OK
        ival = 0
        fval = 0.0
        span_s = 0
        span_n = 0
        span_c = 0
        top = -1
        zero_left = MAX_EMPTY_ITEMS
        pc = 0
        while True:
            op = code[pc, 0]
            a = code[pc, 1]
            pc += 1
            if op == fp.OP_END:
                break
            if op == fp.OP_INT or op == fp.OP_LONG:
                ival, pos, err = _varint(buf, pos, end)
                if err != OK:
                    break
                if op == fp.OP_INT and (ival < -2_147_483_648 or ival > 2_147_483_647):
                    err = INT_RANGE
                    break
                if a != fp.CHECK_NONE and not _check(ival, a):
                    err = MALFORMED
                    break
            elif op == fp.OP_STRING or op == fp.OP_BYTES:
                length, pos, err = _varint(buf, pos, end)
                if err != OK:
                    break
                if length < 0:
                    err = NEG_LEN
                    break
                if length > end - pos:
                    err = TRUNCATED
                    break
                span_s = pos
                span_n = length
                pos += length
                if op == fp.OP_STRING:
                    valid, span_c = _utf8(buf, span_s, pos)
                    if not valid:
                        err = UTF8
                        break
            elif op == fp.OP_BOOL:
                if pos >= end:
                    err = TRUNCATED
                    break
                if buf[pos] > 1:
                    err = MALFORMED
                    break
                ival = buf[pos]
                pos += 1
            elif op == fp.OP_DOUBLE:
                if end - pos < 8:
                    err = TRUNCATED
                    break
                bits = np.uint64(0)
                for k in range(8):
                    bits |= np.uint64(buf[pos + k]) << np.uint64(8 * k)
                u8[0] = bits
                fval = f8[0]
                pos += 8
            elif op == fp.OP_FLOAT:
                if end - pos < 4:
                    err = TRUNCATED
                    break
                bits4 = np.uint32(0)
                for k in range(4):
                    bits4 |= np.uint32(buf[pos + k]) << np.uint32(8 * k)
                u4[0] = bits4
                fval = float(f4[0])
                pos += 4
            elif op == fp.OP_ENUM:
                ival, pos, err = _varint(buf, pos, end)
                if err != OK:
                    break
                if ival < -2_147_483_648 or ival > 2_147_483_647:
                    err = INT_RANGE
                    break
                if ival < 0 or ival >= a:
                    err = BAD_ENUM
                    break
            elif op == fp.OP_UNION:
                idx, pos, err = _varint(buf, pos, end)
                if err != OK:
                    break
                if idx < 0 or idx >= a:
                    err = BAD_UNION
                    break
                pc = branches[code[pc - 1, 2] + idx]
            elif op == fp.OP_JUMP:
                pc = a
            elif op == fp.OP_FIXED:
                if end - pos < a:
                    err = TRUNCATED
                    break
                span_s = pos
                span_n = a
                pos += a
            elif op == fp.OP_BLOCKS:
                count, pos, block_end, zero_left, err = _blocks(
                    buf, pos, end, code[pc - 1, 2], zero_left
                )
                if err != OK:
                    break
                if count == 0:
                    pc = a
                else:
                    top += 1
                    stack_left[top] = count
                    stack_end[top] = block_end
            elif op == fp.OP_NEXT:
                stack_left[top] -= 1
                if stack_left[top] > 0:
                    pc = a
                else:
                    if stack_end[top] >= 0 and pos != stack_end[top]:
                        err = MALFORMED  # the items do not fill the announced byte size
                        break
                    count, pos, block_end, zero_left, err = _blocks(
                        buf, pos, end, code[a - 1, 2], zero_left
                    )
                    if err != OK:
                        break
                    if count == 0:
                        top -= 1
                    else:
                        stack_left[top] = count
                        stack_end[top] = block_end
                        pc = a
            elif op == fp.ST_NUMBER_INT:
                matrix[r, a] = np.float32(float(ival))
                if ival < lo_int[a] or ival > hi_int[a]:
                    state[r, a] = code[pc - 1, 2]
                    raw_int[r, a] = ival
                else:
                    state[r, a] = fp.VALUE
            elif op == fp.ST_NUMBER_FLOAT:
                matrix[r, a] = np.float32(fval)
                if fval != fval:
                    state[r, a] = fp.NAN
                elif fval > _F32_MAX or fval < -_F32_MAX:  # infinite, or beyond float32
                    state[r, a] = fp.INF
                    raw_float[r, a] = fval
                elif fval < lo_float[a] or fval > hi_float[a]:
                    state[r, a] = fp.OUT_OF_RANGE
                    raw_float[r, a] = fval
                else:
                    state[r, a] = fp.VALUE
            elif op == fp.ST_STATE:
                state[r, a] = code[pc - 1, 2]
                raw_float[r, a] = -2.0  # when the state is unseen: a value of another type
            elif op == fp.ST_CATEGORY_ENUM:
                where = enum_lut[code[pc - 1, 2] + ival]
                if where < 0:
                    state[r, a] = fp.UNSEEN
                    raw_int[r, a] = code[pc - 1, 2] + ival
                    raw_float[r, a] = -1.0
                else:
                    matrix[r, a] = np.float32(where)
                    state[r, a] = fp.VALUE
            elif op == fp.ST_CATEGORY_STRING:
                first = code[pc - 1, 2]
                state[r, a] = fp.UNSEEN
                raw_int[r, a] = span_s
                raw_float[r, a] = span_n
                for k in range(code[pc - 1, 3]):
                    c_start = cat_spans[first + k, 0]
                    if cat_spans[first + k, 1] != span_n:
                        continue
                    same = True
                    for m in range(span_n):
                        if cat_bytes[c_start + m] != buf[span_s + m]:
                            same = False
                            break
                    if same:
                        matrix[r, a] = np.float32(k)
                        state[r, a] = fp.VALUE
                        break
            elif op == fp.ST_HOUR or op == fp.ST_WEEKDAY:
                unit = code[pc - 1, 2]
                ms = ival // unit
                if code[pc - 1, 3] and not (_MS_MIN <= ms <= _MS_MAX):
                    state[r, a] = fp.NOT_TIMESTAMP
                else:
                    if op == fp.ST_HOUR:
                        matrix[r, a] = np.float32((ms // _MS_HOUR) % 24)
                    else:
                        matrix[r, a] = np.float32((ms // _MS_DAY + 3) % 7)
                    state[r, a] = fp.VALUE
            elif op == fp.ST_ID:
                ids[r, 0] = a
                ids[r, 1] = ival
                ids[r, 2] = span_s
                ids[r, 3] = span_n
                ids[r, 4] = span_c
                ids[r, 5] = code[pc - 1, 2]
                id_float[r] = fval
            elif op == fp.ST_TIME:
                times[r, 0] = 1
                times[r, 1] = ival if a == 1 else (ival // a if ival >= 0 else -((-ival) // a))
        if err == OK and pos != end:
            err = TRAILING
        status[r] = err
        if err != OK:
            err_at[r] = pos - begin
        else:
            good += 1
    return good


@_njit()
def gather(buf: npt.NDArray[np.uint8], spans: npt.NDArray[np.int64]) -> npt.NDArray[np.uint8]:
    """Concatenate the ``(start, length)`` spans of ``buf``."""
    total = 0
    for i in range(spans.shape[0]):
        total += spans[i, 1]
    out = np.empty(total, dtype=np.uint8)
    at = 0
    for i in range(spans.shape[0]):
        start = spans[i, 0]
        for k in range(spans[i, 1]):
            out[at + k] = buf[start + k]
        at += spans[i, 1]
    return out


@_njit(inline="always")
def _put_long(out: npt.NDArray[np.uint8], pos: int, value: int) -> int:
    """Write ``value`` as an Avro zigzag varint at ``pos``; return the position after it."""
    z = (np.uint64(value) << np.uint64(1)) ^ np.uint64(value >> 63)
    while z > np.uint64(0x7F):
        out[pos] = np.uint8((z & np.uint64(0x7F)) | np.uint64(0x80))
        pos += 1
        z >>= np.uint64(7)
    out[pos] = np.uint8(z)
    return pos + 1


@_njit()
def encode_v1(
    ids: npt.NDArray[np.uint8],
    id_ends: Int64s,
    predictions: npt.NDArray[np.uint8],
    labels: Int64s,
    has_labels: bool,
    version: npt.NDArray[np.uint8],
    times: Int64s,
    scored_at: int,
    out: npt.NDArray[np.uint8],
    ends: Int64s,
) -> int:
    """Write v1 prediction records one after the other into ``out``; return the bytes used.

    ``ids`` holds every id's UTF-8 bytes back to back (record ``i``'s end at ``id_ends[i]``),
    ``predictions`` the little-endian doubles' bytes; ``version`` is the model version already
    encoded as an Avro string. ``ends[i]`` receives where record ``i`` ends. ``out`` must hold
    ``len(ids) + n * (43 + len(version))`` bytes.
    """
    pos = 0
    start = 0
    for i in range(id_ends.shape[0]):
        stop = id_ends[i]
        pos = _put_long(out, pos, stop - start)
        for j in range(start, stop):
            out[pos] = ids[j]
            pos += 1
        start = stop
        for j in range(8):
            out[pos + j] = predictions[i * 8 + j]
        pos += 8
        if has_labels:
            out[pos] = 2
            pos = _put_long(out, pos + 1, labels[i])
        else:
            out[pos] = 0
            pos += 1
        for j in range(version.shape[0]):
            out[pos + j] = version[j]
        pos += version.shape[0]
        pos = _put_long(out, pos, times[i])
        pos = _put_long(out, pos, scored_at)
        ends[i] = pos
    return pos


#: ``decode_v1``'s ``spans`` columns: where the id and the model version are in ``buf``.
V1_ID_START, V1_ID_LEN, V1_VERSION_START, V1_VERSION_LEN = 0, 1, 2, 3
#: ``decode_v1``'s ``longs`` columns: the label (when ``has_label``), the two times in ms.
V1_LABEL, V1_EVENT, V1_SCORED = 0, 1, 2


@_njit(inline="always")
def _v1_string(buf: npt.NDArray[np.uint8], pos: int, end: int) -> tuple[int, int, int]:
    """Read an Avro string: (its start, the position after it, status)."""
    length, pos, err = _varint(buf, pos, end)
    if err != OK:
        return 0, pos, err
    if length < 0:
        return 0, pos, NEG_LEN
    if length > end - pos:
        return 0, pos, TRUNCATED
    valid, _chars = _utf8(buf, pos, pos + length)
    if not valid:
        return 0, pos, UTF8
    return pos, pos + length, OK


@_njit()
def decode_v1(
    buf: npt.NDArray[np.uint8],
    starts: Int64s,
    lens: Int64s,
    max_bytes: int,
    status: Int64s,
    err_at: Int64s,
    spans: Int64s,
    values: npt.NDArray[np.float64],
    has_label: npt.NDArray[np.bool_],
    longs: Int64s,
) -> int:
    """Read a batch of v1 prediction records (``encode_v1``'s layout) into columns.

    The twin of ``encode_v1``, with the decode stage's guards (the statuses of ``run_batch``,
    in the order the generic decoder finds them: the bytes first, to the record's end and its
    trailing bytes, then the timestamps fastavro could not convert, ``malformed_avro``).

    Args:
        buf: the records' bytes, concatenated.
        starts: where each record starts in ``buf``.
        lens: each record's length; -1 for a null value.
        max_bytes: longer records are ``too_large``.
        status: out: each record's status (index into ``REASONS``).
        err_at: out: the byte offset in the record where decoding failed.
        spans: out: ``(n, 4)``: the id's and the model version's start and length in ``buf``.
        values: out: the prediction.
        has_label: out: whether the label is not null.
        longs: out: ``(n, 3)``: the label, the event time, the scoring time (ms).

    Returns:
        How many records decoded.
    """
    f8 = np.zeros(1, dtype=np.float64)
    u8 = f8.view(np.uint64)
    good = 0
    for r in range(starts.shape[0]):
        err_at[r] = 0
        size = lens[r]
        if size < 0:
            status[r] = NULL
            continue
        if size == 0:
            status[r] = EMPTY
            continue
        if size > max_bytes:
            status[r] = TOO_LARGE
            continue
        begin = starts[r]
        end = begin + size
        pos = begin
        err = OK
        while True:  # one pass, left by break: the fields in order
            at, pos, err = _v1_string(buf, pos, end)
            if err != OK:
                break
            spans[r, V1_ID_START] = at
            spans[r, V1_ID_LEN] = pos - at
            if end - pos < 8:
                err = TRUNCATED
                break
            bits = np.uint64(0)
            for k in range(8):
                bits |= np.uint64(buf[pos + k]) << np.uint64(8 * k)
            u8[0] = bits
            values[r] = f8[0]
            pos += 8
            branch, pos, err = _varint(buf, pos, end)
            if err != OK:
                break
            if branch < 0 or branch >= 2:
                err = BAD_UNION
                break
            has_label[r] = branch == 1
            longs[r, V1_LABEL] = 0
            if branch == 1:
                label, pos, err = _varint(buf, pos, end)
                if err != OK:
                    break
                if label < -2_147_483_648 or label > 2_147_483_647:
                    err = INT_RANGE
                    break
                longs[r, V1_LABEL] = label
            at, pos, err = _v1_string(buf, pos, end)
            if err != OK:
                break
            spans[r, V1_VERSION_START] = at
            spans[r, V1_VERSION_LEN] = pos - at
            event, pos, err = _varint(buf, pos, end)
            if err != OK:
                break
            scored, pos, err = _varint(buf, pos, end)
            if err != OK:
                break
            longs[r, V1_EVENT] = event
            longs[r, V1_SCORED] = scored
            if pos != end:
                err = TRAILING
                break
            if not (_check(event, fp.CHECK_TS_MILLIS) and _check(scored, fp.CHECK_TS_MILLIS)):
                err = MALFORMED  # fastavro cannot make a datetime of it
            break
        status[r] = err
        if err != OK:
            err_at[r] = pos - begin
        else:
            good += 1
    return good


#: Microseconds from the Unix epoch to PostgreSQL's (2000-01-01T00:00:00Z).
_PG_EPOCH_US = 946_684_800_000_000


@_njit(inline="always")
def _put_be(out: npt.NDArray[np.uint8], pos: int, value: int, size: int) -> int:
    """Write ``value``'s low ``size`` bytes big-endian at ``pos``; return the position after."""
    v = np.uint64(value)
    for k in range(size):
        out[pos + size - 1 - k] = np.uint8(v & np.uint64(0xFF))
        v >>= np.uint64(8)
    return pos + size


@_njit(inline="always")
def _put_text(
    out: npt.NDArray[np.uint8], pos: int, src: npt.NDArray[np.uint8], start: int, length: int
) -> int:
    """Write a binary COPY text field (its length, then its bytes)."""
    pos = _put_be(out, pos, length, 4)
    for k in range(length):
        out[pos + k] = src[start + k]
    return pos + length


@_njit()
def copy_v1(
    buf: npt.NDArray[np.uint8],
    rows: Int64s,
    spans: Int64s,
    values: npt.NDArray[np.float64],
    has_label: npt.NDArray[np.bool_],
    longs: Int64s,
    topics: npt.NDArray[np.uint8],
    topic_spans: Int64s,
    coordinates: Int64s,
    out: npt.NDArray[np.uint8],
    ends: Int64s,
) -> int:
    """Write the ``rows`` of ``decode_v1``'s columns as PostgreSQL binary COPY tuples.

    The columns of ``postgres.table_columns`` for the v1 schema, in order: id (text),
    prediction (float8), label (int4, NULL when absent), model version (text), event time and
    scoring time (timestamptz), topic (text), partition (int4), offset (int8).
    ``coordinates`` is ``(n, 3)``: per record, its topic's index in ``topic_spans`` (start and
    length in ``topics``), partition and offset. ``ends[i]`` receives where tuple ``i`` ends;
    ``out`` must hold ``78 * len(rows)`` bytes plus the ids', versions' and topics' bytes.

    Returns:
        The bytes used.
    """
    f8 = np.zeros(1, dtype=np.float64)
    u8 = f8.view(np.uint64)
    pos = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        pos = _put_be(out, pos, 9, 2)
        pos = _put_text(out, pos, buf, spans[r, V1_ID_START], spans[r, V1_ID_LEN])
        pos = _put_be(out, pos, 8, 4)
        f8[0] = values[r]
        pos = _put_be(out, pos, u8[0], 8)
        if has_label[r]:
            pos = _put_be(out, pos, 4, 4)
            pos = _put_be(out, pos, longs[r, V1_LABEL], 4)
        else:
            pos = _put_be(out, pos, -1, 4)
        pos = _put_text(out, pos, buf, spans[r, V1_VERSION_START], spans[r, V1_VERSION_LEN])
        for c in (V1_EVENT, V1_SCORED):
            pos = _put_be(out, pos, 8, 4)
            pos = _put_be(out, pos, longs[r, c] * 1000 - _PG_EPOCH_US, 8)
        t = coordinates[r, 0]
        pos = _put_text(out, pos, topics, topic_spans[t, 0], topic_spans[t, 1])
        pos = _put_be(out, pos, 4, 4)
        pos = _put_be(out, pos, coordinates[r, 1], 4)
        pos = _put_be(out, pos, 8, 4)
        pos = _put_be(out, pos, coordinates[r, 2], 8)
        ends[i] = pos
    return pos


@_njit(nogil=True)
def drift_counts(
    matrix: Any,
    edges: Any,
    n_edges: Any,
    categorical: Any,
    sizes: Any,
    out: Any,
) -> None:  # pragma: no cover - compiled
    """Add a batch's bin counts into ``out`` (features, slots): ``stages.drift.Bins.count``.

    One pass over the float32 matrix: a numeric value's bin is the number of its feature's
    ``edges`` (float32, each the least float32 at or above the reference's edge) at or below
    it; a category's is its index (clipped); a NaN or infinite value goes to slot ``sizes[f]``.
    """
    rows, width = matrix.shape
    for i in range(rows):
        for f in range(width):
            v = matrix[i, f]
            if not np.isfinite(v):
                out[f, sizes[f]] += 1
            elif categorical[f]:
                c = int(v)
                out[f, min(max(c, 0), sizes[f] - 1)] += 1
            else:
                k = 0
                while k < n_edges[f] and v >= edges[f, k]:
                    k += 1
                out[f, k] += 1


def _constants_fingerprint() -> int:
    """A checksum of every constant the compiled functions can read from the modules' globals."""
    constants = sorted(
        (f"{module}.{name}", repr(value))
        for module, names in (("plan", vars(fp)), ("kernel", globals()))
        for name, value in names.items()
        if name.isupper() and isinstance(value, int | float | tuple)
    )
    return zlib.crc32(repr(constants).encode())


_FINGERPRINT = _constants_fingerprint()


@_njit()
def _compiled_fingerprint() -> int:
    """``_FINGERPRINT`` as it was when the cached machine code was compiled."""
    return _FINGERPRINT


def _refresh_stale_cache() -> None:
    """Drop numba's cached machine code when it was compiled with other constants."""
    if _compiled_fingerprint() == _FINGERPRINT:
        return
    for value in list(globals().values()):
        if isinstance(value, numba.core.dispatcher.Dispatcher):
            value.recompile()  # compiles the signatures in use, and empties the cache index


_refresh_stale_cache()


def origin() -> str:
    """Where the machine code run so far in this process came from (numba's cache or not)."""
    dispatchers = [v for v in globals().values() if isinstance(v, numba.core.dispatcher.Dispatcher)]
    return jitcache.origin(dispatchers, CACHED)
