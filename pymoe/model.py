"""pymoe.Model: a loaded GGUF model, its description and its tokenizer."""
from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

from . import errors
from ._native import NativeObject, _interrupted, ffi, interrupt_on_ctrl_c, lib, raise_for, run_c
from .chat_prompt import render as render_chat
from .expert_cache import MoeCacheInfo
from .memory import LoadParams, LoadReport, Overrides
from .session import Session


@dataclass(frozen=True)
class ModelInfo:
    arch: str                 # general.architecture, e.g. "llama", "qwen3moe"
    desc: str                 # llama.cpp's one-line description
    n_params: int
    n_bytes: int              # bytes of all weight tensors
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ctx_train: int
    n_experts: int            # 0 for a dense model
    n_experts_used: int
    n_vocab: int
    bos: int                  # -1 if none
    eos: int
    vocab_fingerprint: int    # equal for models sharing a tokenizer
    is_recurrent: bool
    is_hybrid: bool
    n_nextn_layers: int = 0   # MTP (nextn) layers in the file, not counted in n_layers
    mtp_loaded: bool = False  # loaded with mtp=True: Speculative(model, "mtp") can draft with it

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0


def _message_pairs(messages) -> list:
    """[(role, content)] from message dicts or pairs; message text must be valid Unicode."""
    pairs = [(m["role"], m["content"]) if isinstance(m, dict) else tuple(m) for m in messages]
    for role, content in pairs:
        for part in (str(role), str(content)):
            if "\0" in _utf8(part).decode():
                raise errors.InvalidArgumentError("message text holds a NUL character", lib.PYMOE_EINVAL)
    return pairs


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise errors.InvalidArgumentError(
            f"text is not valid Unicode: {text[exc.start]!r} at index {exc.start} (a lone surrogate, as from bytes "
            f"decoded with errors='surrogateescape'); pass bytes to tokenize raw bytes", lib.PYMOE_EINVAL) from None


class _Progress:
    def __init__(self, callback):
        self.callback = callback
        self.error: Optional[BaseException] = None


class Model(NativeObject):
    """A GGUF model loaded through llama.cpp.

    >>> with pymoe.Model("model.gguf") as model:
    ...     with model.session(n_ctx=2048) as s: ...

    close() frees the weights now (closing this model's open sessions first);
    it is idempotent. Sessions keep their model alive until they are closed.
    """

    _kind = "model"

    def __init__(self, path: str | os.PathLike, *, load_mode: str = "auto", n_gpu_layers: int = -1,
                 n_cpu_moe: int = 0, overrides: Overrides = None, rpc_servers=None,
                 progress: Optional[Callable[[float], object]] = None, plan=None, mtp: bool = False,
                 moe_cache_mib: int = 0, moe_cache_uploads: int = 1):
        """load_mode: "auto" (default: mlock when locking can succeed, else
        no-mmap with a warning), "mlock", "no-mmap" or "mmap". n_gpu_layers:
        layers on offload devices (-1 = all). n_cpu_moe: keep the routed experts
        of the first N layers in RAM. overrides: {regex: device} (or
        ["regex=device"]), first match wins. rpc_servers: ["host:port", ...]
        rpc-server processes used as offload devices. plan: a pymoe.plan()
        for this model, whose n_gpu_layers, n_cpu_moe and moe_cache_mib are used. mtp: also
        load the model's MTP head (its nextn layers) for Speculative(model,
        "mtp"); UnsupportedError for a model without one. moe_cache_mib: device
        memory for an expert cache (the recently used experts of the layers
        whose experts stay in RAM; see `moe_cache`), moe_cache_uploads: most
        experts copied into it per layer and decode (0: no limit; 1, the
        default, measured best: bench/results/expert_cache.md)."""
        if plan is not None:
            n_gpu_layers, n_cpu_moe = plan.n_gpu_layers, plan.n_cpu_moe
            moe_cache_mib = moe_cache_mib or plan.moe_cache_mib
        self.path = os.fspath(path)
        self._sessions: "weakref.WeakSet" = weakref.WeakSet()
        load = LoadParams(self.path, load_mode=load_mode, n_gpu_layers=n_gpu_layers, n_cpu_moe=n_cpu_moe,
                          overrides=overrides, rpc_servers=rpc_servers, mtp=mtp, moe_cache_mib=moe_cache_mib,
                          moe_cache_uploads=moe_cache_uploads)
        params = load.c
        state = None
        if progress is not None:
            state = _Progress(progress)
            handle = ffi.new_handle(state)
            params.progress = lib._pymoe_on_progress
            params.progress_user_data = handle
        out = ffi.new("pymoe_model **")
        interrupt_on_ctrl_c()
        if rpc_servers:  # on a helper thread: a lost rpc-server is an error, not a wait forever
            self._remote = lib.pymoe_rpc_failures()
        with self._building(out, lib.pymoe_model_free):
            rc, detail = run_c(lib.pymoe_model_load, params, out, remote=bool(rpc_servers))
            if state is not None and state.error is not None:
                raise state.error
            if rc != 0 or _interrupted:
                raise_for(rc, detail)
            self._own(out[0], lib.pymoe_model_free)
            self._closing = False  # set by close(): no new sessions
            self._controls = None  # _control_tokens(), once asked
            info = ffi.new("struct pymoe_model_info *")
            report = ffi.new("struct pymoe_load_report *", {"size": ffi.sizeof("struct pymoe_load_report")})
            cache = ffi.new("struct pymoe_moe_cache_info *")
            with self._call() as ptr:
                self._run(lib.pymoe_model_info, ptr, info)
                self._run(lib.pymoe_model_load_report, ptr, report)
                self._run(lib.pymoe_model_moe_cache, ptr, cache)
            self.info = ModelInfo(
                arch=ffi.string(info.arch).decode(), desc=ffi.string(info.desc).decode(),
                n_params=info.n_params, n_bytes=info.n_bytes, n_layers=info.n_layers, n_embd=info.n_embd,
                n_head=info.n_head, n_head_kv=info.n_head_kv, n_ctx_train=info.n_ctx_train,
                n_experts=info.n_experts, n_experts_used=info.n_experts_used, n_vocab=info.n_vocab,
                bos=info.bos, eos=info.eos, vocab_fingerprint=info.vocab_fingerprint,
                is_recurrent=bool(info.is_recurrent), is_hybrid=bool(info.is_hybrid),
                n_nextn_layers=info.n_nextn_layers, mtp_loaded=bool(info.mtp_loaded))
            self.load_report = LoadReport._from_c(report)
            self.moe_cache = MoeCacheInfo._from_c(cache)

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> "Model":
        """Same as Model(path, **kwargs)."""
        return cls(path, **kwargs)

    # -- lifetime ---------------------------------------------------------
    def close(self) -> None:
        """Close this model's sessions (each after its running call, which is
        asked to stop), then free the weights. BusyError from inside a call of
        the model or of one of its sessions (a callback)."""
        if self._ptr is None:
            return
        self._check_closable()
        for session in list(self._sessions):
            session._check_closable()
        with self._lock:
            self._closing = True  # sessions are created under the lock: none can start now
        for session in list(self._sessions):  # contexts are freed before their model
            session.close()
        super().close()

    def _add_session(self, create):
        """Run create(model pointer) under the model's lock, unless the model is closing."""
        with self._call(wait=True) as ptr:
            if self._closing:
                raise errors.ClosedError("the model is closed", lib.PYMOE_ESTATE)
            return create(ptr)

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.info.desc
        return f"<pymoe.Model {os.path.basename(self.path)!r} {state}>"

    # -- sessions ---------------------------------------------------------
    def session(self, **params) -> Session:
        """A new session (context) over this model; see pymoe.Session for params."""
        return Session(self, **params)

    # -- vocabulary -------------------------------------------------------
    def tokenize(self, text: str | bytes, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        data = _utf8(text) if isinstance(text, str) else bytes(text)
        n_out = ffi.new("int32_t *")
        capacity = len(data) + 8
        while True:
            out = ffi.new("pymoe_token[]", capacity)
            with self._call(wait=True) as ptr:
                rc = lib.pymoe_model_tokenize(ptr, data, len(data), add_special, parse_special, out, capacity, n_out)
            if rc == lib.PYMOE_ENOSPACE:
                capacity = n_out[0]
                continue
            self._status(rc)
            return list(out[0:n_out[0]])

    def detokenize(self, tokens: Iterable[int], *, render_special: bool = False) -> str:
        toks = list(tokens)
        arr = ffi.new("pymoe_token[]", toks)
        n_out = ffi.new("int32_t *")
        capacity = 8 * len(toks) + 16
        while True:
            buf = ffi.new("char[]", capacity)
            with self._call(wait=True) as ptr:
                rc = lib.pymoe_model_detokenize(ptr, arr, len(toks), render_special, buf, capacity, n_out)
            if rc == lib.PYMOE_ENOSPACE:
                capacity = n_out[0]
                continue
            self._status(rc)
            return ffi.unpack(buf, n_out[0]).decode("utf-8", "replace")

    def token_piece(self, token: int, *, render_special: bool = False) -> bytes:
        """The bytes of one token (may be part of a UTF-8 sequence)."""
        buf, n_out = ffi.new("char[]", 256), ffi.new("int32_t *")  # per call: threads share the model
        with self._call(wait=True) as ptr:
            rc = lib.pymoe_model_token_piece(ptr, token, render_special, buf, 256, n_out)
            if rc == lib.PYMOE_ENOSPACE:
                buf = ffi.new("char[]", n_out[0])
                rc = lib.pymoe_model_token_piece(ptr, token, render_special, buf, n_out[0], n_out)
        self._status(rc)
        return ffi.unpack(buf, n_out[0])

    def chat_format(self, messages, *, add_assistant: bool = True) -> str:
        """The conversation [{"role": ..., "content": ...}, ...] (or (role,
        content) pairs) as the model's chat template writes it.
        UnsupportedError without a known template. To feed it, use
        chat_tokenize: tokenizing this text with parse_special=True would make
        special-token text inside a message ("</s>") a real control token."""
        pairs = _message_pairs(messages)
        keep = [ffi.new("char[]", str(x).encode()) for pair in pairs for x in pair]
        arr = ffi.new("struct pymoe_chat_message[]", max(len(pairs), 1))
        for i in range(len(pairs)):
            arr[i].role, arr[i].content = keep[2 * i], keep[2 * i + 1]
        n = ffi.new("int32_t *")
        size = 256 + 2 * sum(len(x) for x in keep)
        while True:
            buf = ffi.new("char[]", size)
            with self._call(wait=True) as ptr:
                rc = lib.pymoe_model_chat_format(ptr, arr, len(pairs), add_assistant, buf, size, n)
            if rc != lib.PYMOE_ENOSPACE:
                self._status(rc)
                return ffi.unpack(buf, n[0]).decode("utf-8", "replace")
            size = n[0]

    def chat_tokenize(self, messages, *, add_assistant: bool = True, add_special: bool = True) -> list[int]:
        """The tokens of chat_format(messages): the template's markers as special
        tokens, every message's text as plain text, whatever it contains."""
        return render_chat(self, _message_pairs(messages), add_assistant).tokens(self, add_special=add_special)

    def _control_tokens(self) -> list:
        """[(token, its text, strip flags)], longest text first: what parse_special looks for, in its order."""
        if self._controls is None:
            n = ffi.new("int32_t *")
            with self._call(wait=True) as ptr:
                lib.pymoe_model_control_tokens(ptr, ffi.NULL, ffi.NULL, 0, n)
                ids, strip = ffi.new("pymoe_token[]", max(n[0], 1)), ffi.new("uint8_t[]", max(n[0], 1))
                self._run(lib.pymoe_model_control_tokens, ptr, ids, strip, n[0], n)
            found = [(ids[i], self.token_piece(ids[i], render_special=True).decode("utf-8", "replace"), strip[i])
                     for i in range(n[0])]
            self._controls = sorted((c for c in found if c[1]), key=lambda c: -len(c[1]))
        return self._controls

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, EOT, ...)."""
        with self._call(wait=True) as ptr:
            return bool(lib.pymoe_model_token_is_eog(ptr, token))
