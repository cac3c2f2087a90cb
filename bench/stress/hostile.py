"""Crafted files: broken and malicious safetensors, torch pickles and images, as bytes. Each is what a
damaged download, a wrong file or an attacker could put where the pack reads."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import torch

from .session import MARKER

PWNED = Path("/tmp") / f"{MARKER}_pwned"  # a malicious pickle would create this


def _safetensors(header: dict | bytes, data: bytes, declared: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def good_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


def broken_safetensors(valid: bytes) -> dict[str, bytes]:
    """Variants of a valid file (whose metadata makes it look like the real thing) broken one way each."""
    (n,) = struct.unpack("<Q", valid[:8])
    header = json.loads(valid[8:8 + n])
    data = valid[8 + n:]
    meta = header.get("__metadata__", {})
    first = next(k for k in header if k != "__metadata__")
    entry = header[first]

    def with_entry(**change) -> bytes:
        h = dict(header)
        h[first] = {**entry, **change}
        return _safetensors(h, data)

    return {
        "empty": b"",
        "short": valid[:5],
        "header_beyond_file": _safetensors(header, data, declared=n + len(data) + 1000),
        "header_huge": _safetensors(header, data, declared=2 ** 63),
        "header_not_json": _safetensors(b"{not json" + b" " * 20, data),
        "header_not_utf8": _safetensors(b"\xff\xfe\x00garbage", data),
        "header_a_list": _safetensors(b"[1, 2, 3]", data),
        "entry_not_object": _safetensors({**header, first: [1, 2]}, data),
        "offsets_beyond_data": with_entry(data_offsets=[0, len(data) + 4096]),
        "offsets_reversed": with_entry(data_offsets=[8, 0]),
        "offsets_negative": with_entry(data_offsets=[-8, 4]),
        "offsets_overlap": _safetensors({"__metadata__": meta, "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                         "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)),
        "shape_disagrees": with_entry(shape=[10 ** 6]),
        "shape_negative": with_entry(shape=[-1]),
        "dtype_unknown": with_entry(dtype="Q17"),
        "metadata_not_strings": _safetensors({**header, "__metadata__": {k: [1] for k in meta}}, data),
        "truncated": valid[:len(valid) - max(1, len(data) // 2)],
        "torch_pickle": malicious_pickle(),
        "random": os.urandom(4096),
    }


def malicious_pickle() -> bytes:
    """A torch zip file whose pickle runs ``touch PWNED`` when loaded unsafely."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {PWNED}",))

    buf = io.BytesIO()
    torch.save({"step": 1, "payload": Payload()}, buf)
    return buf.getvalue()


def broken_states(valid: bytes) -> dict[str, bytes]:
    """A trainer's ``.state.pt``, damaged, replaced or malicious."""
    return {"empty": b"", "truncated": valid[:len(valid) // 2], "malicious_pickle": malicious_pickle(),
            "random": os.urandom(2048), "a_safetensors_file": good_safetensors({"x": torch.zeros(2)}, {}),
            "plain_pickle_dict": _plain_pickle()}


def _plain_pickle() -> bytes:
    import pickle

    return pickle.dumps({"step": 1, "optimizer": None})


def png(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg(seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def bomb_png(side: int = 40_000) -> bytes:
    """A PNG of ``side`` x ``side`` black 1-bit pixels: a few hundred kB that decode to gigabytes."""
    row = b"\x00" + bytes((side + 7) // 8)
    raw = zlib.compress(row * side, 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")
