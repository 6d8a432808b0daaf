"""A GGUF file as editable parts, and back to bytes with a map of every field.

The fuzzer's mutators edit a parsed model (metadata values, tensor entries) and
then the bytes themselves at known fields (a string's length, an array's count,
a tensor's dims). Parsing needs a valid file (the seeds); writing takes any
values, including ones no valid file has (a length that lies, a type that does
not exist)."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

# GGUF value types, as numbered in the format
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)
SCALAR_FORMAT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
                 U64: "<Q", I64: "<q", F64: "<d"}
ALL_TYPES = tuple(range(13))


@dataclass
class Value:
    type: int
    value: object            # int/float/bool, bytes (STRING), or list of values (ARRAY)
    item_type: int = U8      # ARRAY only


@dataclass
class Tensor:
    name: bytes
    dims: list[int]
    type: int
    offset: int


@dataclass
class Gguf:
    version: int = 3
    kv: list[tuple[bytes, Value]] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)
    data: bytes = b""
    alignment: int = 32

    def get(self, key: bytes):
        for k, v in self.kv:
            if k == key:
                return v
        return None

    def set(self, key: bytes, value: Value) -> None:
        for i, (k, _) in enumerate(self.kv):
            if k == key:
                self.kv[i] = (key, value)
                return
        self.kv.append((key, value))

    def arch(self) -> bytes:
        v = self.get(b"general.architecture")
        return v.value if v is not None and v.type == STRING else b"llama"


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> bytes:
        n = self.take("<Q")
        s = self.data[self.pos:self.pos + n]
        self.pos += n
        return s

    def value(self, t: int):
        if t == STRING:
            return self.string()
        if t == ARRAY:
            item, n = self.take("<I"), self.take("<Q")
            return Value(ARRAY, [self.value(item) for _ in range(n)], item)
        return self.take(SCALAR_FORMAT[t])


def parse(data: bytes) -> Gguf:
    """A valid GGUF (the seeds) as parts."""
    r = _Reader(data)
    if data[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    r.pos = 4
    g = Gguf(version=r.take("<I"))
    n_tensors, n_kv = r.take("<Q"), r.take("<Q")
    for _ in range(n_kv):
        key = r.string()
        t = r.take("<I")
        v = r.value(t)
        g.kv.append((key, v if isinstance(v, Value) else Value(t, v)))
    for _ in range(n_tensors):
        name = r.string()
        dims = [r.take("<Q") for _ in range(r.take("<I"))]
        g.tensors.append(Tensor(name, dims, r.take("<I"), r.take("<Q")))
    align = g.get(b"general.alignment")
    g.alignment = align.value if align is not None and align.type == U32 else 32
    start = -(-r.pos // g.alignment) * g.alignment
    g.data = data[start:]
    return g


@dataclass
class Field:
    """Where one number of the header lies in the written bytes, and what it means."""
    offset: int
    fmt: str     # struct format of the number as written
    kind: str    # "n_tensors", "n_kv", "key_len", "value_type", "str_len", "array_type", "array_len",
    #              "n_dims", "dim", "tensor_type", "tensor_offset", "scalar", "version"


class _Writer:
    def __init__(self):
        self.out = bytearray()
        self.fields: list[Field] = []

    def put(self, fmt: str, v, kind: str = "") -> None:
        if kind:
            self.fields.append(Field(len(self.out), fmt, kind))
        if fmt[1] in "bBhHiIqQ":  # any integer is written, wrapped to the field's width
            bits = 8 * struct.calcsize(fmt)
            v = int(v) & ((1 << bits) - 1)
            if fmt[1].islower() and v >= 1 << (bits - 1):
                v -= 1 << bits
        self.out += struct.pack(fmt, v)

    def string(self, s: bytes, kind: str = "str_len") -> None:
        self.put("<Q", len(s), kind)
        self.out += s

    def value(self, v: Value) -> None:
        if v.type == STRING:
            self.string(v.value)
        elif v.type == ARRAY:
            self.put("<I", v.item_type, "array_type")
            self.put("<Q", len(v.value), "array_len")
            for item in v.value:
                self.value(item if isinstance(item, Value) else Value(v.item_type, item))
        elif v.type in SCALAR_FORMAT:
            self.put(SCALAR_FORMAT[v.type], v.value, "scalar")
        else:
            self.out += bytes(v.value if isinstance(v.value, bytes) else b"")  # a type that does not exist


def value_bytes(v: Value) -> tuple[bytes, list[Field]]:
    """One value written alone (the seeds' values are written once and reused)."""
    w = _Writer()
    w.value(v)
    return bytes(w.out), w.fields


def write(g: Gguf, cache: dict | None = None) -> tuple[bytes, list[Field]]:
    """The bytes of g and the map of its header's numbers; cache: id(value) -> value_bytes(value)
    for values that live as long as the cache."""
    w = _Writer()
    w.out += b"GGUF"
    w.put("<I", g.version, "version")
    w.put("<Q", len(g.tensors), "n_tensors")
    w.put("<Q", len(g.kv), "n_kv")
    for key, v in g.kv:
        w.string(key, "key_len")
        w.put("<I", v.type, "value_type")
        if cache is not None and id(v) in cache:
            raw, fields = cache[id(v)]
            w.fields += [Field(f.offset + len(w.out), f.fmt, f.kind) for f in fields]
            w.out += raw
        else:
            w.value(v)
    for t in g.tensors:
        w.string(t.name)
        w.put("<I", len(t.dims), "n_dims")
        for d in t.dims:
            w.put("<Q", d, "dim")
        w.put("<I", t.type, "tensor_type")
        w.put("<Q", t.offset, "tensor_offset")
    align = g.alignment if g.alignment > 0 else 32
    w.out += b"\0" * (-len(w.out) % align)
    return bytes(w.out) + g.data, w.fields
