"""Which tensor a malformed or truncated weights file lacks, for the loader's error messages.

safetensors and the gguf package fail on such files before naming a tensor (a header check, a numpy
reshape). These readers walk the headers themselves and return the first tensor whose bytes lie past
the end of the file or do not match its shape and dtype; None when they find none (or cannot parse the
header, which the caller's message already says).
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from typing import Optional

_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


def safetensors_culprit(path) -> Optional[str]:
    """``"tensor 'name' ..."`` for the first tensor a safetensors file cannot hold, or None."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > size - 8:  # not a header length: nothing to name (and nothing to read into memory)
                return None
            header = json.loads(fh.read(n))
        data = size - 8 - n
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for name, info in entries:
            begin, end = info["data_offsets"]
            want = math.prod(info["shape"]) * _SAFETENSORS_DTYPE_BYTES.get(info["dtype"], 0)
            if end > data:
                return f"tensor {name!r} needs bytes {begin}..{end} of the data, the file holds {max(data, 0)}"
            if info["dtype"] in _SAFETENSORS_DTYPE_BYTES and end - begin != want:
                return (f"tensor {name!r} spans {end - begin} bytes, its shape {info['shape']} of "
                        f"{info['dtype']} needs {want}")
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None
    return None


# GGUF metadata value types: fixed sizes; 8 = string, 9 = array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_culprit(path) -> Optional[str]:
    """``"tensor 'name' ..."`` for the first tensor whose data lies past the end of a GGUF file, or None."""
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _gguf_culprit(_Cursor(buf))
    except _Truncated as e:
        return str(e)
    except (OSError, ValueError, KeyError, struct.error, IndexError):
        return None


def _gguf_culprit(r: "_Cursor") -> Optional[str]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    if r.take(4) != b"GGUF":
        return None
    r.u32()  # version
    n_tensors, n_kv = r.u64(), r.u64()
    alignment = 32
    for _ in range(n_kv):
        key, value = r.string(), r.value(r.u32())
        if key == "general.alignment":
            alignment = int(value)
    infos = []
    for _ in range(n_tensors):
        name, dims = r.string(), [r.u64() for _ in range(r.u32())]
        kind, offset = GGMLQuantizationType(r.u32()), r.u64()
        block, size = GGML_QUANT_SIZES[kind]
        infos.append((name, offset, math.prod(dims) // block * size, kind.name))
    start = -(-r.pos // alignment) * alignment
    for name, offset, nbytes, kind in sorted(infos, key=lambda t: t[1]):
        if start + offset + nbytes > len(r.buf):
            return (f"tensor {name!r} ({kind}) needs bytes {start + offset}..{start + offset + nbytes}, "
                    f"the file holds {len(r.buf)}")
    return None


class _Truncated(ValueError):
    pass


class _Cursor:
    def __init__(self, buf):  # bytes or an mmap
        self.buf, self.pos = buf, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise _Truncated(f"the header runs past the end of the file ({len(self.buf)} bytes)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def string(self) -> str:
        return self.take(self.u64()).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind == 8:
            return self.string()
        if kind == 9:
            item, n = self.u32(), self.u64()
            if item in _GGUF_SIZES:  # skip numeric arrays (vocabulary scores, token types) in one step
                self.take(n * _GGUF_SIZES[item])
                return None
            return [self.value(item) for _ in range(n)]
        raw = self.take(_GGUF_SIZES[kind])
        return int.from_bytes(raw, "little") if kind in (0, 2, 4, 10) else None
