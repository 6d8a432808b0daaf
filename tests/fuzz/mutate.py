"""Structured mutations of a GGUF model: its metadata (the values pymoe and
llama.cpp read, with every value type), its tensor entries (types, dims,
offsets, names), the numbers of its header at the byte level (lengths, counts,
types), truncations at many offsets, and bit flips. A case is one seed and 1-3
mutations, all drawn from one random.Random, so a case number reproduces it."""
from __future__ import annotations

import copy
import random
import struct

from gguf_codec import (ARRAY, BOOL, F32, F64, I8, I16, I32, I64, SCALAR_FORMAT, STRING, U8, U16, U32, U64, Field,
                        Gguf, Tensor, Value, write)

INT_TYPES = (U8, I8, U16, I16, U32, I32, U64, I64)
INT_RANGE = {U8: (0, 2**8 - 1), I8: (-2**7, 2**7 - 1), U16: (0, 2**16 - 1), I16: (-2**15, 2**15 - 1),
             U32: (0, 2**32 - 1), I32: (-2**31, 2**31 - 1), U64: (0, 2**64 - 1), I64: (-2**63, 2**63 - 1)}
# numbers at the edges of what readers assume: counts, layer limits, sizes that overflow when multiplied
INTERESTING = (0, 1, 2, 3, 7, 8, 31, 32, 63, 64, 255, 256, 257, 511, 512, 513, 1023, 1024, 4096, 32000, 65535,
               65536, 2**20, 2**24, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1)
# metadata that pymoe or llama.cpp reads, relative to the architecture where it starts with "."
ARCH_KEYS = (".block_count", ".expert_count", ".expert_used_count", ".embedding_length", ".attention.head_count",
             ".attention.head_count_kv", ".attention.key_length", ".attention.value_length", ".context_length",
             ".feed_forward_length", ".expert_feed_forward_length", ".rope.dimension_count",
             ".attention.layer_norm_rms_epsilon", ".nextn_predict_layers", ".ssm.conv_kernel", ".ssm.inner_size",
             ".ssm.state_size", ".ssm.group_count", ".ssm.time_step_rank", ".full_attention_interval",
             ".rope.dimension_sections", ".expert_shared_feed_forward_length", ".attention.sliding_window",
             ".vocab_size", ".expert_gating_func", ".leading_dense_block_count")
KEYS = ("general.architecture", "general.alignment", "general.file_type", "split.count", "split.no",
        "split.tensors.count", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")
ARCHES = (b"llama", b"qwen3moe", b"qwen35moe", b"qwen35", b"gpt-oss", b"mamba", b"bert", b"t5", b"deepseek2",
          b"glm4moe", b"qwen3next", b"", b"x" * 200, b"\xff\xfe", b"llama\0moe")
TOKENIZERS = (b"llama", b"gpt2", b"bert", b"t5", b"rwkv", b"none", b"no_vocab", b"plamo2", b"ugm", b"", b"bogus")


def _int_value(rng: random.Random, t: int) -> int:
    lo, hi = INT_RANGE[t]
    v = rng.choice(INTERESTING) if rng.random() < 0.8 else rng.randint(lo, hi)
    if rng.random() < 0.2:
        v = -v
    return min(max(v, lo), hi)


def random_value(rng: random.Random, depth: int = 0) -> Value:
    """A value of any type: integers mostly (the keys read are counts), edge values first."""
    t = rng.choice(INT_TYPES * 3 + (F32, F64, BOOL, STRING, ARRAY))
    if t in INT_TYPES:
        return Value(t, _int_value(rng, t))
    if t in (F32, F64):
        return Value(t, rng.choice((0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), 3.5)))
    if t == BOOL:
        return Value(t, rng.random() < 0.5)
    if t == STRING:
        return Value(t, rng.choice((b"", b"a", b"\xff\xfe\xfd", b"%s%n", b"x" * 5000, b"blk.0.attn_q.weight")))
    item = rng.choice(INT_TYPES + (F32, STRING)) if depth == 0 else U32
    n = rng.choice((0, 1, 2, 3, 4, 8, 64))
    items = [random_value_of(rng, item) for _ in range(n)]
    return Value(ARRAY, items, item)


def random_value_of(rng: random.Random, t: int):
    if t in INT_TYPES:
        return _int_value(rng, t)
    if t == F32:
        return rng.choice((0.0, -1.0, 1.0))
    return rng.choice((b"", b"a", b"<s>", b"\xff"))


def _key(rng: random.Random, g: Gguf) -> bytes:
    if rng.random() < 0.7:
        return g.arch() + rng.choice(ARCH_KEYS).encode()
    if rng.random() < 0.7:
        return rng.choice(KEYS).encode()
    return rng.choice(g.kv)[0] if g.kv else b"general.name"


# structured mutations: each edits g and returns a short description


def set_value(rng, g):
    key = _key(rng, g)
    v = random_value(rng)
    if v.type == ARRAY and key.endswith((b"head_count", b"head_count_kv")):  # per-layer arrays
        n = g.get(g.arch() + b".block_count")
        n = n.value if n is not None and isinstance(n.value, int) else 2
        v = Value(ARRAY, [_int_value(rng, U32) for _ in range(rng.choice((max(n, 0) % 600, 1, 0)))], U32)
    g.set(key, v)
    return f"set {key[:60]!r} = {v.type}:{str(v.value)[:40]}"


def set_count(rng, g):
    """A count pymoe checks against a limit, just past it or just within."""
    key = g.arch() + rng.choice((b".block_count", b".expert_count", b".expert_used_count", b".nextn_predict_layers",
                                  b".attention.head_count", b".attention.head_count_kv", b".embedding_length"))
    v = rng.choice((0, 1, 2, 3, 4, 5, 255, 256, 257, 511, 512, 513, 65536, 2**31 - 1, 2**31, 2**32 - 1))
    t = rng.choice((U32, U32, I32, U64, I64, U16, U8))
    lo, hi = INT_RANGE[t]
    g.set(key, Value(t, min(max(v, lo), hi)))
    return f"count {key!r} = {v} ({t})"


def remove_key(rng, g):
    if not g.kv:
        return "remove nothing"
    i = rng.randrange(len(g.kv)) if rng.random() < 0.5 else None
    key = g.kv[i][0] if i is not None else _key(rng, g)
    g.kv = [(k, v) for k, v in g.kv if k != key]
    return f"remove {key[:60]!r}"


def duplicate_key(rng, g):
    if not g.kv:
        return "duplicate nothing"
    k, v = rng.choice(g.kv)
    g.kv.insert(rng.randrange(len(g.kv) + 1), (k, random_value(rng) if rng.random() < 0.5 else v))
    return f"duplicate {k[:60]!r}"


def set_arch(rng, g):
    a = rng.choice(ARCHES)
    old = g.arch()
    g.set(b"general.architecture", Value(STRING, a))
    if rng.random() < 0.5:  # move the architecture's keys along, so the new name is read with values
        g.kv = [(a + k[len(old):] if k.startswith(old + b".") else k, v) for k, v in g.kv]
    return f"arch {a[:20]!r}"


def tokenizer(rng, g):
    what = rng.randrange(5)
    if what == 0:
        m = rng.choice(TOKENIZERS)
        g.set(b"tokenizer.ggml.model", Value(STRING, m))
        return f"tokenizer model {m!r}"
    key = rng.choice((b"tokenizer.ggml.tokens", b"tokenizer.ggml.scores", b"tokenizer.ggml.token_type"))
    v = g.get(key)
    if v is None or v.type != ARRAY:
        return "tokenizer: no array"
    if what == 1:  # shorter, longer or empty
        n = rng.choice((0, 1, 2, 3, 10, len(v.value) - 1, len(v.value) + 1))
        items = list(v.value[:n]) + v.value[-1:] * max(0, n - len(v.value))  # an empty array stays empty
        g.set(key, Value(ARRAY, items, v.item_type))
        return f"{key.decode()} length {n}"
    if what == 2:  # another item type
        t = rng.choice((U8, I32, U32, F32, STRING, BOOL))
        g.set(key, Value(ARRAY, [random_value_of(rng, t) if t != BOOL else True for _ in v.value[:64]], t))
        return f"{key.decode()} of type {t}"
    if what == 3:  # special token ids out of range
        k = rng.choice((b"tokenizer.ggml.bos_token_id", b"tokenizer.ggml.eos_token_id",
                        b"tokenizer.ggml.unknown_token_id", b"tokenizer.ggml.padding_token_id"))
        g.set(k, Value(rng.choice((U32, I32)), rng.choice((2**31 - 1, 32000, 31999, 0, 2**31))
                       if rng.random() < 0.5 else 32000))
        return f"{k.decode()} out of range"
    items = list(v.value)  # token texts: empty, invalid UTF-8, huge
    for _ in range(rng.randint(1, 5)):
        i = rng.randrange(len(items)) if items else 0
        if items and isinstance(items[i], bytes):
            items[i] = rng.choice((b"", b"\xff\xfe", b"\xe2\x96", b"<0x", b"<0xZZ>", b"a" * 70000))
    g.set(key, Value(ARRAY, items, v.item_type))
    return f"{key.decode()} items edited"


def tensor_edit(rng, g):
    if not g.tensors:
        return "no tensor"
    i = rng.randrange(len(g.tensors))
    t = g.tensors[i]
    what = rng.randrange(9)
    if what == 0:
        t.type = rng.choice((0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 30, 31, 39, 40, 41, 255, 2**31, 2**32 - 1))
    elif what == 1:
        j = rng.randrange(len(t.dims)) if t.dims else 0
        if t.dims:
            t.dims[j] = rng.choice((0, 1, 3, 31, 33, 2**31, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1))
    elif what == 2:
        t.dims = t.dims[:-1] if len(t.dims) > 1 and rng.random() < 0.5 else t.dims + [rng.choice((1, 2, 2**20))]
    elif what == 3:
        t.offset = rng.choice((t.offset + 1, t.offset + 16, 2**40, 2**63, 2**64 - 32, 0, len(g.data)))
    elif what == 4:
        t.name = rng.choice((b"", b"x" * 70, b"x" * 100000, g.tensors[rng.randrange(len(g.tensors))].name,
                             b"blk.999.attn_q.weight", b"blk.-1.ffn_up_exps.weight", b"blk.2147483648.x",
                             b"blk.511.ffn_gate_exps.weight", b"\xff\xfe"))
    elif what == 5:
        del g.tensors[i]
    elif what == 6:
        g.tensors.insert(rng.randrange(len(g.tensors) + 1), copy.copy(t))
    elif what == 7:
        t.dims = list(reversed(t.dims))
    else:
        g.tensors[i], g.tensors[-1] = g.tensors[-1], g.tensors[i]  # out of offset order
    return f"tensor {t.name[:40]!r} edit {what}"


def data_cut(rng, g):
    n = rng.choice((0, 1, len(g.data) // 2, len(g.data) - 1, rng.randrange(len(g.data) + 1)))
    g.data = g.data[:n]
    return f"data cut to {n}"


def header(rng, g):
    what = rng.randrange(3)
    if what == 0:
        g.version = rng.choice((0, 1, 2, 4, 2**16, 2**32 - 1))
        return f"version {g.version}"
    if what == 1:
        a = rng.choice((0, 1, 2, 3, 8, 64, 2**16, 2**31, 2**32 - 1))
        g.set(b"general.alignment", Value(U32, a))
        g.alignment = a if a and a < 2**20 and a & (a - 1) == 0 else 32
        return f"alignment {a}"
    n = rng.choice((2, 3, 128, 129, 65535, 2**31))
    g.set(b"split.count", Value(rng.choice((U16, U32)), min(n, 65535)))
    return f"split.count {n}"


STRUCTURED = (set_value, set_value, set_count, set_count, remove_key, duplicate_key, set_arch, tokenizer, tokenizer,
              tensor_edit, tensor_edit, tensor_edit, data_cut, header)

# byte-level mutations of the written file: each returns the new bytes and a description


def overwrite_field(rng, data: bytes, fields: list[Field]):
    by_kind: dict[str, list[Field]] = {}
    for f in fields:  # the map may be older than the bytes (a corpus entry's): only fields still inside them
        if f.offset + struct.calcsize(f.fmt) <= len(data):
            by_kind.setdefault(f.kind, []).append(f)
    if not by_kind:
        return flip_bits(rng, data, fields)
    f = rng.choice(by_kind[rng.choice(sorted(by_kind))])
    size = struct.calcsize(f.fmt)
    (old,) = struct.unpack_from(f.fmt, data, f.offset)
    mask = (1 << (8 * size)) - 1
    choices = [0, 1, mask, mask - 1, mask >> 1, (mask >> 1) + 1, 2**31 - 1, 2**32, 2**40, 13, 12, 63, 64, 65]
    if isinstance(old, int):
        choices += [old + 1, old - 1, old * 2, old + 8, old << 8]
    v = rng.choice(choices) & mask
    raw = v.to_bytes(size, "little")
    return data[:f.offset] + raw + data[f.offset + size:], f"field {f.kind}@{f.offset} = {v}"


def truncate(rng, data: bytes, fields: list[Field]):
    if fields and rng.random() < 0.6:
        n = rng.choice(fields).offset + rng.randint(-2, 9)
    else:
        n = rng.randrange(len(data) + 1)
    n = min(max(n, 0), len(data))
    return data[:n], f"truncate at {n}"


def flip_bits(rng, data: bytes, fields: list[Field]):
    end = min(max(fields[-1].offset + 8, 16) if fields else len(data), len(data))
    b = bytearray(data)
    for _ in range(rng.randint(1, 8) if end else 0):
        i = rng.randrange(end)
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b), "bit flips"


def splice(rng, data: bytes, fields: list[Field]):
    """Insert or delete a few bytes in the header: every later number shifts."""
    end = min(fields[-1].offset if fields else len(data), len(data))
    i = rng.randrange(max(end, 1))
    if rng.random() < 0.5:
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 8))) + data[i:], f"insert at {i}"
    return data[:i] + data[i + rng.randint(1, 8):], f"delete at {i}"


BYTES = (overwrite_field, overwrite_field, overwrite_field, truncate, truncate, flip_bits, splice)


def mutate_structure(rng: random.Random, seed: Gguf, n: int) -> tuple[Gguf, list[str]]:
    """n structured mutations of a copy of the seed (the seed is not changed)."""
    g = Gguf(seed.version, list(seed.kv), [copy.copy(t) for t in seed.tensors], seed.data, seed.alignment)
    for t in g.tensors:
        t.dims = list(t.dims)
    return g, [rng.choice(STRUCTURED)(rng, g) for _ in range(n)]


def mutate(rng: random.Random, seed: Gguf, cache: dict | None = None) -> tuple[bytes, list[str]]:
    """One case: 1-3 structured mutations of the seed, then maybe one of the bytes; or one of the bytes alone."""
    structured = rng.random() < 0.75
    g, done = mutate_structure(rng, seed, rng.randint(1, 3) if structured else 0)
    data, fields = write(g, cache)
    if not structured or rng.random() < 0.3:
        data, what = rng.choice(BYTES)(rng, data, fields)
        done.append(what)
    return data, done
