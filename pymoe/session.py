"""pymoe.Session: one llama.cpp context over a Model, driven token by token."""
from __future__ import annotations

import sys
import weakref
from typing import Iterator, List, Optional, Union

import numpy as np

from . import errors
from ._native import NativeObject, _interrupted, ffi, interrupt_on_ctrl_c, lib, params_struct, raise_for, run_c
from .decoder import Decoder, Token, Tokens, check_logprobs, scores_from_c  # noqa: F401 - Token and Tokens are part of this module's interface
from .expert_cache import MoeCacheStats
from .grammar import constrained_sample
from .logits import LogitsView, make_view
from .sampling import SamplingParams, seed_or_random

_ABORT_WHEN_SET = ffi.addressof(lib, "pymoe_abort_when_set")
_refs = getattr(sys, "getrefcount", None)  # how the logits copy knows no view reads it any more
FLASH_ATTN = {"auto": lib.PYMOE_FLASH_ATTN_AUTO, "on": lib.PYMOE_FLASH_ATTN_ON, "off": lib.PYMOE_FLASH_ATTN_OFF}


def _token_array(tokens) -> np.ndarray:
    """Tokens as a contiguous 1-D int32 array; values outside int32 raise OverflowError
    (numpy would wrap them silently). Token ids are integers: floats, bools and
    strings are refused, not rounded."""
    if isinstance(tokens, np.ndarray) and tokens.dtype == np.int32 and tokens.ndim == 1:
        return np.ascontiguousarray(tokens)
    try:
        given = np.asarray(tokens)
    except (TypeError, ValueError):  # ragged nesting
        given = None
    if given is not None and given.dtype == object and given.ndim == 1 and given.size and \
            all(type(t) is int for t in given):  # Python ints beyond int64
        raise OverflowError
    if given is None or (given.size and given.dtype.kind not in "iu") or given.dtype.kind in "bSUV":
        what = type(tokens).__name__ if given is None or given.dtype == object else f"{given.dtype} values"
        raise errors.InvalidArgumentError(f"token ids must be integers, got {what}", lib.PYMOE_EINVAL)
    if given.dtype.kind == "u" and given.size and given.max() >= 2**31:
        raise OverflowError
    wide = given.astype(np.int64)
    if wide.ndim > 1:
        raise errors.InvalidArgumentError("tokens must be an int or a 1-D sequence", lib.PYMOE_EINVAL)
    if wide.size and (wide.min() < -2**31 or wide.max() >= 2**31):
        raise OverflowError
    return wide.reshape(-1).astype(np.int32)


class Session(NativeObject, Decoder):
    """A context (KV cache, logits) over a model.

    feed() appends tokens and evaluates them; logits()/logits_all() are
    read-only views (of a copy the views own) valid until the next feed,
    rewind, reset, state load or close; sample() draws the next token from the last logits;
    generate_tokens() and generate() (the pymoe.Decoder interface) loop over both.
    """

    _kind = "session"

    def __init__(self, model, *, n_ctx: int = 4096, n_batch: int = 512, n_ubatch: int = 512,
                 n_threads: int = 0, n_threads_batch: int = 0, flash_attn: str = "auto",
                 cache_type_k: Optional[str] = None, cache_type_v: Optional[str] = None,
                 n_rs_seq: int = 0, sampling: Optional[SamplingParams] = None, seed: Optional[int] = None,
                 record_routing: bool = False):
        if flash_attn not in FLASH_ATTN:
            raise errors.InvalidArgumentError(
                f"flash_attn must be one of {sorted(FLASH_ATTN)}, got {flash_attn!r}", lib.PYMOE_EINVAL)
        for name, value in (("n_ctx", n_ctx), ("n_batch", n_batch), ("n_ubatch", n_ubatch),
                            ("n_threads", n_threads), ("n_threads_batch", n_threads_batch), ("n_rs_seq", n_rs_seq)):
            if not isinstance(value, int) or value < 0 or value > 2**31 - 1:
                raise errors.InvalidArgumentError(f"{name} must be an int in [0, 2**31), got {value!r}",
                                                  lib.PYMOE_EINVAL)
        self._logits_epoch = 0  # moves on whenever the logits memory stops being valid
        self._view_memory: Optional[np.ndarray] = None  # the copy logits views read (see _logits_view)
        self._view_refs = 0
        self.model = model  # keeps the model alive as long as this session
        params = params_struct("pymoe_session_params")
        params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_ubatch
        params.n_threads, params.n_threads_batch = n_threads, n_threads_batch
        params.flash_attn = FLASH_ATTN[flash_attn]
        params.n_rs_seq = n_rs_seq
        params.record_routing = bool(record_routing)
        self._stop = ffi.new("int32_t *")  # set by close() from another thread: the running feed stops
        params.abort, params.abort_user_data = _ABORT_WHEN_SET, self._stop
        keep = []
        for name, value in (("cache_type_k", cache_type_k), ("cache_type_v", cache_type_v)):
            if value is not None:
                keep.append(ffi.new("char[]", value.encode()))
                setattr(params, name, keep[-1])
        out = ffi.new("pymoe_session **")

        self._remote = model._remote

        def create(model_ptr):
            self._run(lib.pymoe_session_create, model_ptr, params, out)
            # the model (and the stop flag the context reads) outlive the context, whatever the collector does
            self._own(out[0], lib.pymoe_session_free, model, self._stop)
            model._sessions.add(self)

        self._loops: "weakref.WeakSet" = weakref.WeakSet()  # the speculative loops driving this session
        with self._building(out, lib.pymoe_session_free):
            model._add_session(create)
            self.n_ctx = lib.pymoe_session_n_ctx(self._ptr)
            self.n_vocab = lib.pymoe_session_n_vocab(self._ptr)
            self.n_threads = lib.pymoe_session_n_threads(self._ptr)  # for one-token decodes (0 asked: physical cores)
            self.is_recurrent = bool(lib.pymoe_session_is_recurrent(self._ptr))  # hybrid or recurrent model
            self.n_rs_seq = lib.pymoe_session_n_rs_seq(self._ptr)  # snapshots llama.cpp granted (<= asked)
            self.sampling = sampling if sampling is not None else SamplingParams()
            self._one = ffi.new("pymoe_token[1]")
            self._token_out = ffi.new("pymoe_token *")
            self._rows = ffi.new("float **")
            self._n_rows = ffi.new("int32_t *")
            self._rng = ffi.new("uint64_t *")
            self.seed(seed_or_random(seed))
        self.stop_reason: Optional[str] = None  # why the last generate() ended

    # -- lifetime ---------------------------------------------------------
    def _interrupt(self) -> None:
        self._stop[0] = 1

    def _logits_moved(self) -> None:
        self._logits_epoch += 1

    def _raise_for(self, rc: int, detail=None) -> None:
        if rc == lib.PYMOE_EABORTED and self._stop[0]:
            raise errors.ClosedError("the session was closed by another thread during this call", lib.PYMOE_ESTATE)
        raise_for(rc, detail)

    def _check_closable(self) -> None:
        super()._check_closable()
        for loop in list(self._loops):
            loop._check_closable()

    def _before_close(self) -> None:
        for loop in list(self._loops):  # a loop points into its sessions: its C object goes first
            NativeObject.close(loop)  # not Speculative.close: that would close this session again
        self._logits_epoch += 1  # logits views die with the session

    @property
    def tokens(self) -> List[int]:
        """The tokens the context holds, oldest first (a copy)."""
        return self._tokens_from(lib.pymoe_session_tokens)

    @property
    def position(self) -> int:
        """Tokens in the context (the position the next token gets)."""
        with self._call() as ptr:
            return lib.pymoe_session_position(ptr)

    def __repr__(self) -> str:
        if self.closed:
            return "<pymoe.Session closed>"
        return f"<pymoe.Session position={self.position}/{self.n_ctx}>"

    # -- token-level control ----------------------------------------------
    def feed(self, tokens: Tokens, *, all_logits: bool = False) -> None:
        """Append tokens and evaluate them. all_logits keeps the logits of every
        fed position (len(tokens) <= n_batch). On error nothing changes."""
        ptr = self._enter()
        try:
            self._logits_epoch += 1
            self._stop[0] = 0  # a stop asked for before this call (a loop's close) was for an earlier one
            detail = None
            if type(tokens) is int and self._remote is None:  # the per-token fast path
                self._one[0] = tokens
                rc = lib.pymoe_session_feed(ptr, self._one, 1, all_logits)
            else:
                arr = _token_array(tokens)
                if arr.size == 0:
                    raise errors.InvalidArgumentError("feed() needs at least one token", lib.PYMOE_EINVAL)
                interrupt_on_ctrl_c()  # a prompt may take minutes: Ctrl-C stops it
                rc, detail = run_c(lib.pymoe_session_feed, ptr, ffi.from_buffer("pymoe_token[]", arr), arr.size,
                                   all_logits, remote=self._remote is not None)
        except OverflowError:  # an int too large for int32
            raise errors.TokenOutOfVocabularyError(
                f"a token id does not fit in int32, so it is outside the vocabulary [0, {self.n_vocab})",
                lib.PYMOE_ETOKEN) from None
        finally:  # inline, not _leave(): Ctrl-C is raised at a Python call's start, and must not skip this
            self._user = None
            self._lock.release()
        if rc != 0 or _interrupted:  # _status, inline (a session has no callbacks): the per-token path
            self._raise_for(rc, detail)


    @property
    def moe_cache(self) -> Optional[MoeCacheStats]:
        """What the model's expert cache did for this session's decodes since
        it was created (its MTP head's included), or None without a cache."""
        if not self.model.moe_cache.enabled:
            return None
        out = ffi.new("struct pymoe_moe_cache_stats *")
        self._c(lib.pymoe_session_moe_cache_stats, out)
        return MoeCacheStats._from_c(out)

    def routing(self, layer: int) -> np.ndarray:
        """The experts the router chose for each token of the last feed in
        `layer`, shape (n_tokens, n_experts_used), a copy (no rows for a layer
        without routed experts). Needs Session(record_routing=True)."""
        ptr, used, n = ffi.new("int32_t **"), ffi.new("int32_t *"), ffi.new("int32_t *")
        with self._call() as session:
            self._run(lib.pymoe_session_routing, session, layer, ptr, used, n)
            if n[0] == 0:
                return np.zeros((0, used[0]), np.int32)
            return np.frombuffer(ffi.buffer(ptr[0], 4 * n[0] * used[0]), np.int32).reshape(n[0], used[0]).copy()

    def _logits_view(self, last_only: bool) -> LogitsView:
        """A read-only view of a copy of llama.cpp's logits (made while the
        session is in use, so that no close can free them meanwhile) in memory
        the session's views own: it lives as long as any of them, so the
        buffer protocol of a stale view (unchecked before Python 3.12) reads
        old logits, never freed memory. The copy is reused while no view of it
        is left: its reference count is back at what it was when it was made,
        counted the same way (where there is no count, as on PyPy: a new one)."""
        with self._call() as ptr:
            self._run(lib.pymoe_session_logits, ptr, self._rows, self._n_rows)
            rows, n_rows = self._rows[0], self._n_rows[0]
            if last_only:
                rows, shape = rows + (n_rows - 1) * self.n_vocab, (self.n_vocab,)
            else:
                shape = (n_rows, self.n_vocab)
            n = n_rows * self.n_vocab if not last_only else self.n_vocab
            memory = self._view_memory
            if memory is None or memory.size < n or _refs is None or _refs(memory) != self._view_refs:
                memory = self._view_memory = np.empty(max(n, self.n_vocab), np.float32)
                self._view_refs = _refs(memory) if _refs is not None else 0
            ffi.memmove(ffi.from_buffer("float[]", memory), rows, 4 * n)
            return make_view(self, memory[:n], shape)

    def logits(self) -> LogitsView:
        """Logits of the last fed position, shape (n_vocab,)."""
        return self._logits_view(last_only=True)

    def logits_all(self) -> LogitsView:
        """Logits of every position of the last feed, shape (n_rows, n_vocab):
        one row per fed token with feed(..., all_logits=True), otherwise one."""
        return self._logits_view(last_only=False)

    def seed(self, seed: int) -> None:
        """Reset the random state: the same seed gives the same samples."""
        lib.pymoe_rng_seed(self._rng, seed & 0xFFFFFFFFFFFFFFFF)

    def set_sampling(self, sampling: SamplingParams, seed: Optional[int] = None) -> None:
        """Sample with these settings from now on (session.sampling), the draws from seed (None: a random one)."""
        if not isinstance(sampling, SamplingParams):
            raise errors.InvalidArgumentError(f"expected SamplingParams, got {type(sampling).__name__}",
                                              lib.PYMOE_EINVAL)
        self.sampling = sampling  # checked by the C library at the next sample
        self.seed(seed_or_random(seed))

    def sample(self, sampling: Optional[SamplingParams] = None) -> int:
        """Draw the next token from the last logits (session.sampling by default)."""
        params = (sampling or self.sampling).c_params
        ptr = self._enter()
        try:
            rc = lib.pymoe_session_sample(ptr, params, self._rng, self._token_out)
        finally:
            self._user = None
            self._lock.release()
        if rc != 0:
            self._raise_for(rc)
        return self._token_out[0]

    def rewind(self, n: int) -> None:
        """Drop the last n positions (the logits go with them). Recurrent state
        rewinds at most rewind_limit positions (snapshots); else restore a checkpoint."""
        self._c(lib.pymoe_session_rewind, n, moves=True)

    @property
    def rewind_limit(self) -> int:
        """How many positions rewind() can drop now."""
        with self._call() as ptr:
            return lib.pymoe_session_rewind_limit(ptr)

    def checkpoint(self) -> None:
        """Remember this point of a hybrid/recurrent model's state (its recurrent
        part: O(1) in the context length); restore() comes back to it."""
        self._c(lib.pymoe_session_checkpoint)

    @property
    def checkpoint_bytes(self) -> int:
        """Bytes a checkpoint copies (the recurrent state of the sequence; 0 without one)."""
        with self._call() as ptr:
            return lib.pymoe_session_checkpoint_size(ptr)

    def restore(self) -> None:
        """Go back to the last checkpoint, dropping the positions after it."""
        self._c(lib.pymoe_session_restore, moves=True)

    def reset(self) -> None:
        """Empty the context."""
        self._c(lib.pymoe_session_reset, moves=True)

    def save_state(self) -> bytearray:
        """The tokens, KV cache and position, to restore with load_state() (written once, into the bytearray
        returned)."""
        with self._call() as ptr:
            return self._save_bytes(lib.pymoe_session_state_save, ptr)

    @property
    def state_size(self) -> int:
        return self._saved_size(lib.pymoe_session_state_save)

    def load_state(self, state) -> None:
        """Go back to a saved state (bytes-like) of a session of the same model, context size and cache types;
        feed a token before reading logits again."""
        self._c(lib.pymoe_session_state_load, *self._bytes_in(state), moves=True)

    # -- generation (the Decoder interface) -----------------------------------
    takes_grammar = True

    def generate_tokens(self, prompt: Union[str, Tokens, None] = None, *, max_tokens: int = 128,
                        sampling: Optional[SamplingParams] = None, stop_at_eog: bool = True,
                        grammar=None, logprobs: Optional[int] = None) -> Iterator[int]:
        """Feed the prompt (text or tokens; None continues from the last logits),
        then yield token ids one by one. Every yielded token is already in the
        context. Ends at max_tokens, an end-of-generation token (not yielded)
        or a full context; stop_reason says which. grammar: a pymoe.grammar.Grammar
        that constrains what is sampled (generation ends where the grammar does,
        in an end-of-generation token); without one, the sampling's grammar or
        json_schema, if any, makes one. logprobs=n: self.scores is each
        yielded token's Scores (n alternatives) while it is the last yielded."""
        if max_tokens < 0:
            raise errors.InvalidArgumentError("max_tokens must be >= 0", lib.PYMOE_EINVAL)
        check_logprobs(logprobs)
        scored = ffi.new("struct pymoe_logprob *") if logprobs is not None else None
        self.scores = None
        if grammar is None:
            grammar = (sampling or self.sampling).constraint(self.model)
        if isinstance(prompt, str):
            prompt = self.model.tokenize(prompt, add_special=self.position == 0)
        if prompt is not None and (type(prompt) is int or len(prompt) > 0):
            self.feed(prompt)
        self.stop_reason = "max_tokens"
        for _ in range(max_tokens):
            token = self.sample(sampling) if grammar is None else constrained_sample(self, grammar, sampling)
            if stop_at_eog and self.model.is_eog(token):
                self.stop_reason = "eog"
                return
            if self.position >= self.n_ctx:
                self.stop_reason = "context_full"
                return
            if scored is not None:  # before the feed: from the row the token was drawn from
                self._c(lib.pymoe_session_logprob, token, logprobs, scored)
                self.scores = scores_from_c(scored)
            if grammar is not None:
                grammar.accept(token)
            self.feed(token)
            yield token
