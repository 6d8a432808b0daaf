"""Speculative decoding: a draft model, the target's MTP head or the context itself proposes, the target verifies
(the loop runs in C)."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import errors, learned
from ._native import NativeObject, _callback_error, check, ffi, interrupt_on_ctrl_c, lib, params_struct, run_c
from .decoder import Decoder, Scores, Tokens, check_logprobs, scores_from_c
from .expert_cache import MoeCacheStats
from .grammar import Grammar, attach as attach_grammar
from .model import Model
from .sampling import SamplingParams, seed_or_random
from .session import Session, _token_array

MAX_DRAFT = lib.PYMOE_SPEC_MAX_DRAFT
NGRAM_MAX = lib.PYMOE_NGRAM_MAX
_C_DEFAULTS = params_struct("pymoe_spec_params")
ROLLBACK = {"auto": lib.PYMOE_ROLLBACK_AUTO, "remove": lib.PYMOE_ROLLBACK_REMOVE,
            "snapshot": lib.PYMOE_ROLLBACK_SNAPSHOT, "checkpoint": lib.PYMOE_ROLLBACK_CHECKPOINT}
ROLLBACK_NAMES = {v: name for name, v in ROLLBACK.items()}
AUTO_SNAPSHOTS = 4  # draft_max="auto" on a hybrid target: rounds drafting more take a checkpoint


def default_snapshots(rollback: str, draft_max: Union[int, str], k_max: int = 8) -> int:
    """The recurrent-state snapshots a hybrid target's session asks for when
    none are given: none for checkpoints; else one per draft token of a fixed
    draft length, and for auto AUTO_SNAPSHOTS (each snapshot is another copy of
    the recurrent state, and auto seldom drafts that many tokens on MoE targets)."""
    if rollback not in ("auto", "snapshot"):
        return 0
    return min(k_max, AUTO_SNAPSHOTS) if draft_max == "auto" else int(draft_max)


STOP_REASONS = {lib.PYMOE_STOP_NONE: None, lib.PYMOE_STOP_MAX_TOKENS: "max_tokens", lib.PYMOE_STOP_EOG: "eog",
                lib.PYMOE_STOP_CONTEXT_FULL: "context_full", lib.PYMOE_STOP_CALLBACK: "callback"}


def verify(draft: Sequence[int], p, q=None, u=None, *, greedy: bool = False) -> Tuple[int, int]:
    """The C verifier on NumPy rows: p is (k+1, n_vocab) target rows, q (k, n_vocab)
    draft rows and u k+1 uniforms (both unused when greedy). Returns
    (n_accepted, next_token)."""
    d = _token_array(list(draft))
    k = d.size
    p = np.ascontiguousarray(p, dtype=np.float32)
    if p.ndim != 2 or p.shape[0] != k + 1:
        raise errors.InvalidArgumentError(f"p must have shape (k + 1, n_vocab) = ({k + 1}, n), got {p.shape}",
                                          lib.PYMOE_EINVAL)
    n_vocab = p.shape[1]
    q_ptr = u_ptr = ffi.NULL
    if not greedy:
        q = np.ascontiguousarray(np.zeros((0, n_vocab)) if q is None else q, dtype=np.float32)
        u = np.ascontiguousarray(u if u is not None else [], dtype=np.float64)
        if q.shape != (k, n_vocab) or u.shape != (k + 1,):
            raise errors.InvalidArgumentError(
                f"stochastic verification needs q of shape ({k}, {n_vocab}) and {k + 1} uniforms", lib.PYMOE_EINVAL)
        q_ptr, u_ptr = ffi.from_buffer("float[]", q), ffi.from_buffer("double[]", u)
    n_acc, nxt = ffi.new("int32_t *"), ffi.new("pymoe_token *")
    mode = lib.PYMOE_VERIFY_GREEDY if greedy else lib.PYMOE_VERIFY_STOCHASTIC
    check(lib.pymoe_verify(mode, ffi.from_buffer("pymoe_token[]", d), k, q_ptr, ffi.from_buffer("float[]", p),
                           n_vocab, u_ptr, n_acc, nxt))
    return n_acc[0], nxt[0]


def verify_sparse(draft: Sequence[int], p_rows, q_rows, u, n_vocab: int) -> Tuple[int, int]:
    """Stochastic verification on sparse rows: p_rows (k+1) and q_rows (k) are
    (ids, probabilities) pairs, ids ascending, every other token at 0. The same
    decision as verify() on the rows written out densely. Returns (n_accepted, next_token)."""
    d = _token_array(list(draft))
    k = d.size
    if len(p_rows) != k + 1 or len(q_rows) != k or len(u) != k + 1:
        raise errors.InvalidArgumentError(f"need {k + 1} p rows, {k} q rows and {k + 1} uniforms", lib.PYMOE_EINVAL)
    keep = []  # the arrays behind the C rows live until the call returns

    def rows(pairs):
        out = ffi.new("struct pymoe_sparse_row[]", max(1, len(pairs)))
        for row, (ids, probs) in zip(out, pairs):
            ids, probs = _token_array(list(ids)), np.ascontiguousarray(probs, dtype=np.float32)
            if ids.shape != probs.shape:
                raise errors.InvalidArgumentError("each row needs as many probabilities as ids", lib.PYMOE_EINVAL)
            keep.extend((ids, probs))
            row.ids, row.p, row.n = ffi.from_buffer("pymoe_token[]", ids), ffi.from_buffer("float[]", probs), ids.size
        return out

    u = np.ascontiguousarray(u, dtype=np.float64)
    n_acc, nxt = ffi.new("int32_t *"), ffi.new("pymoe_token *")
    check(lib.pymoe_verify_sparse(ffi.from_buffer("pymoe_token[]", d), k, rows(q_rows), rows(p_rows), n_vocab,
                                  ffi.from_buffer("double[]", u), n_acc, nxt))
    return n_acc[0], nxt[0]


@dataclass(frozen=True)
class NgramDraft:
    """Drafts copied from the context (prompt lookup), for Speculative's draft
    (alone) or ngram (with a draft model). The longest suffix of the sequence
    (prompt and output, across turns until reset) that occurred before, of
    n_min up to n_max tokens, proposes what followed it there. It costs
    microseconds a round and no memory on a device. With draft_max="auto" the
    loop learns per match length how often such drafts are accepted and
    verifies only as many as pay for their batch; a round without a match (or
    with one too short to pay) is decoded plainly, or left to the draft model."""
    n_min: int = _C_DEFAULTS.ngram_min
    n_max: int = _C_DEFAULTS.ngram_max

    def __post_init__(self):
        for name in ("n_min", "n_max"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise errors.InvalidArgumentError(f"NgramDraft.{name} must be an int, got {v!r}", lib.PYMOE_EINVAL)
        if not 1 <= self.n_min <= self.n_max <= NGRAM_MAX:
            raise errors.InvalidArgumentError(f"NgramDraft needs 1 <= n_min <= n_max <= {NGRAM_MAX}, got n_min "
                                              f"{self.n_min}, n_max {self.n_max}", lib.PYMOE_EINVAL)


@dataclass(frozen=True)
class LookupStats:
    """Drafts copied from the context, for one match length."""
    matches: int    # rounds that found a match of this length
    rounds: int     # of which drafted from it (the others decoded plainly, or by the draft model)
    drafted: int
    accepted: int

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass(frozen=True)
class SpecStats:
    rounds: int
    drafted: int
    accepted: int
    emitted: int
    accepted_hist: List[int]           # rounds by accepted draft tokens (index = count)
    draft_seconds: float
    verify_seconds: float
    other_seconds: float
    draft_sampling_seconds: float      # of draft_seconds: the draft's sampling transforms and draws
    target_sampling_seconds: float     # of other_seconds: the target rows' sampling transforms
    verifier_seconds: float            # of other_seconds: the verifier
    verify_seconds_by_n: Dict[int, float]  # mean seconds of a target batch of n tokens
    rounds_by_k: Dict[int, int]        # rounds by the draft length chosen for them
    last_k: int
    max_verify_batch: int              # the largest target batch a round evaluated (< 32: never offloaded)
    acceptance_estimate: float         # what draft_max="auto" currently believes
    gated_rounds: int                  # rounds auto's cost model would have drafted in, made plain because
                                       # whole rounds measured against plain ones did not show a gain
    rollback_target: str               # how each model drops rejected drafts: remove, snapshot, checkpoint
    rollback_draft: str
    checkpoints: int                   # checkpoints saved (both models)
    restores: int                      # checkpoints restored after partial acceptances
    refed_tokens: int                  # tokens the target evaluated again after restores
    rollback_seconds: float            # saving/restoring checkpoints, dropping positions
    checkpoint_bytes: int              # bytes one target checkpoint copies (0: none taken)
    lookup: Dict[int, LookupStats]     # drafts copied from the context, by match length (included in
                                       # drafted and accepted)
    depth_drafted: List[int]           # a draft model's or MTP head's drafts by depth (index i: the i-th
    depth_accepted: List[int]          # token of a round; tested only after the ones before were accepted)
    mtp_seconds: float                 # of draft_seconds: the MTP head's catch-up and drafts
    mtp_tokens: int                    # positions the MTP head evaluated
    moe_cache: Optional[MoeCacheStats] = None  # the target's expert cache (MTP head included) since the
                                       # target session was created; None without a cache

    @property
    def depth_acceptance(self) -> Dict[int, float]:
        """Acceptance of the i-th draft token of a round, given the ones before it were accepted."""
        return {i: a / n for i, (n, a) in enumerate(zip(self.depth_drafted, self.depth_accepted)) if n}

    @property
    def lookup_drafted(self) -> int:
        return sum(s.drafted for s in self.lookup.values())

    @property
    def lookup_accepted(self) -> int:
        return sum(s.accepted for s in self.lookup.values())

    @property
    def rollback_seconds_per_round(self) -> float:
        return self.rollback_seconds / self.rounds if self.rounds else 0.0

    @property
    def acceptance(self) -> float:
        """Accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_second(self) -> float:
        t = self.draft_seconds + self.verify_seconds + self.other_seconds + self.rollback_seconds
        return self.emitted / t if t > 0 else 0.0


@ffi.def_extern(onerror=_callback_error)
def _pymoe_on_round(round_, user_data):
    state = ffi.from_handle(user_data)
    n, v = round_.n_draft, round_.n_vocab
    logits = np.frombuffer(ffi.buffer(round_.target_logits, 4 * (n + 1) * v), dtype=np.float32).reshape(n + 1, v)
    draft = [round_.draft[i] for i in range(n)]
    try:
        state.callback(draft, logits.copy(), round_.n_accepted, round_.next)
    except BaseException as exc:  # noqa: BLE001 - reported after the round
        state.error = exc


def _sources(draft, ngram) -> Tuple[Union[Model, Session, None], Optional[NgramDraft], bool]:
    """(the draft model or session, or None; the lookup drafts, or None; MTP drafts) from Speculative's arguments."""
    lookup, mtp = None, False
    if isinstance(draft, str):
        if draft not in ("ngram", "mtp"):
            raise errors.InvalidArgumentError(f"draft must be a Model, a Session, \"mtp\", \"ngram\" or an "
                                              f"NgramDraft, got {draft!r} (load a GGUF with pymoe.Model first)",
                                              lib.PYMOE_EINVAL)
        mtp = draft == "mtp"
        draft, lookup = None, None if mtp else NgramDraft()
    elif isinstance(draft, NgramDraft):
        draft, lookup = None, draft
    elif draft is None:
        raise errors.InvalidArgumentError("draft is required: a Model, a Session, \"mtp\", \"ngram\" or an "
                                          "NgramDraft", lib.PYMOE_EINVAL)
    if ngram is not None and ngram is not False:
        if lookup is not None:
            raise errors.InvalidArgumentError("ngram adds lookup drafts to a draft model or the MTP head; the draft "
                                              "is lookup already", lib.PYMOE_EINVAL)
        if ngram is True:
            lookup = NgramDraft()
        elif isinstance(ngram, NgramDraft):
            lookup = ngram
        else:
            raise errors.InvalidArgumentError(f"ngram must be an NgramDraft, True or None, got {ngram!r}",
                                              lib.PYMOE_EINVAL)
    return draft, lookup, mtp


class _Inspect:
    def __init__(self, callback):
        self.callback, self.error = callback, None


class Speculative(NativeObject, Decoder):
    """Speculative decoding of a target model with drafts from a draft model of
    the same tokenizer, from the target's own MTP head, from the context itself
    (n-gram lookup), or lookup with one of the others.

    target and draft are Models (sessions are created with session_params) or
    empty Sessions (used as they are, owned by the caller); draft may instead
    be "mtp": the target's multi-token-prediction head drafts (a model with
    nextn layers, loaded with Model(path, mtp=True); no second model, no
    second vocabulary), or "ngram" / an NgramDraft: drafts copied from the
    context, no draft model. ngram (an NgramDraft, or True for the defaults)
    adds lookup drafts to a draft model or the MTP head: a match long enough
    to pay drafts first, the model drafts otherwise. draft_max is the fixed
    draft length k, or "auto": each round picks k in [0, k_max] from the
    measured draft time, verify time per batch size and acceptance rate, per
    draft depth for the MTP head (k = 0 is plain decoding; lookup drafts learn
    their acceptance per match length). The default is 4 with a draft model
    alone, "auto" (k_max 8) with the MTP head and "auto" (k_max 16) with
    lookup drafts. temperature 0 verifies greedily; otherwise the
    output follows the target's sampling distribution exactly (sampling
    defaults are SamplingParams'; or pass sampling=SamplingParams(...)
    instead of its fields). draft_p_min: stop drafting a round when the
    draft's top probability falls below it (its confidence; 0 = never).
    grammar (GBNF) or json_schema constrains every generation (a
    generate_tokens(grammar=...) of its own overrides it): drafts it forbids
    are cut, and each verify row is the constrained distribution after the
    drafts before it, so the output is plain constrained decoding's.

    rollback: how the target drops rejected drafts, "auto" (the cheapest it
    supports), "remove" (KV cache), "snapshot" (recurrent-state snapshots) or
    "checkpoint" (save before verifying, restore and evaluate again). For a
    hybrid or recurrent target created here from a Model, "auto" and
    "snapshot" ask llama.cpp for n_rs_seq snapshots: the fixed draft length,
    or min(k_max, 4) with "auto" (pass n_rs_seq to choose: each one costs a
    copy of the recurrent state).

    warm_start: with draft_max "auto", start from what auto learned in an
    earlier loop over the same models on this machine, and keep what this one
    learns when it closes (a file in the cache folder, or in the folder given
    here; pymoe/learned.py). False: start cold, keep nothing. The default is
    on for a draft model and lookup drafts, off for the MTP head (where warm
    loops measured slower than cold ones). warm_started says whether this
    loop did start warm.
    """

    _kind = "speculative decoder"
    _inspect = None  # the inspect callback's state (set_inspect)

    def __init__(self, target: Union[Model, Session], draft: Union[Model, Session, str, NgramDraft], *,
                 ngram: Union[None, bool, NgramDraft] = None, draft_max: Union[int, str, None] = None,
                 k_max: Optional[int] = None, draft_p_min: float = 0.0,
                 temperature: float = SamplingParams.temperature, top_k: int = SamplingParams.top_k,
                 top_p: float = SamplingParams.top_p, min_p: float = SamplingParams.min_p,
                 seed: Optional[int] = None, rollback: str = "auto", grammar: Optional[str] = None,
                 json_schema=None, sampling: Optional[SamplingParams] = None,
                 warm_start: Union[None, bool, str, os.PathLike] = None, **session_params):
        if rollback not in ROLLBACK:
            raise errors.InvalidArgumentError(f"rollback must be one of {list(ROLLBACK)}, got {rollback!r}",
                                              lib.PYMOE_EINVAL)
        if warm_start is not None and not isinstance(warm_start, (bool, str, os.PathLike)):
            raise errors.InvalidArgumentError(f"warm_start must be True, False or a folder, got {warm_start!r}",
                                              lib.PYMOE_EINVAL)
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise errors.InvalidArgumentError(f"sampling must be a SamplingParams, got {type(sampling).__name__}",
                                              lib.PYMOE_EINVAL)
        if sampling is None:
            sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                      grammar=grammar, json_schema=json_schema)
        elif (temperature, top_k, top_p, min_p, grammar, json_schema) != (
                SamplingParams.temperature, SamplingParams.top_k, SamplingParams.top_p, SamplingParams.min_p,
                None, None):
            raise errors.InvalidArgumentError("give sampling=SamplingParams(...) or its fields (temperature, top_k, "
                                              "top_p, min_p, grammar, json_schema), not both", lib.PYMOE_EINVAL)
        self._sampling = sampling
        self._grammar = None  # the Grammar constraining the rounds now (generate_tokens)
        self._scoring = -1  # set_logprobs: how many alternatives the rounds score (-1: none)
        self._scoring_owner = None  # the generation that set it
        self.round_scores: List[Scores] = []  # step()'s tokens' Scores, while set_logprobs asks for them
        draft, lookup, mtp = _sources(draft, ngram)
        if warm_start is None:  # measured: warm MTP loops drafted too long on the MTP bench model (docs/speed.md)
            warm_start = not mtp
        if draft_max is None:
            draft_max = "auto" if lookup or mtp else 4
        if k_max is None:
            k_max = 16 if lookup else 8
        auto = draft_max == "auto"
        k = k_max if auto else draft_max
        if not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= MAX_DRAFT:
            what = "k_max" if auto else "draft_max"
            raise errors.InvalidArgumentError(f"{what} must be an int in [0, {MAX_DRAFT}] (or draft_max='auto'), "
                                              f"got {k!r}", lib.PYMOE_EINVAL)
        self._owned: List[Session] = []
        target_params = dict(session_params)
        snapshots = default_snapshots(rollback, draft_max, k_max)
        if isinstance(target, Model) and (target.info.is_hybrid or target.info.is_recurrent) and snapshots:
            target_params.setdefault("n_rs_seq", snapshots)
        draft_params = {name: v for name, v in session_params.items() if name != "n_rs_seq"}
        self.target = self._session(target, target_params)
        self.draft: Optional[Session] = None
        try:
            self.draft = self._session(draft, draft_params) if draft is not None else None
        except BaseException:
            self._close_owned()
            raise
        self.ngram: Optional[NgramDraft] = lookup
        self.mtp = mtp
        params = params_struct("pymoe_spec_params")
        params.draft_max, params.auto_draft, params.draft_p_min = k, auto, draft_p_min
        params.rollback = ROLLBACK[rollback]
        params.draft_sources = ((lib.PYMOE_DRAFT_MODEL if self.draft is not None else 0) |
                                (lib.PYMOE_DRAFT_MTP if mtp else 0) | (lib.PYMOE_DRAFT_LOOKUP if lookup else 0))
        if lookup:
            params.ngram_min, params.ngram_max = lookup.n_min, lookup.n_max
        params.sampling = self._sampling.c_params  # read by pymoe_spec_create only
        params.seed = seed_or_random(seed)
        out = ffi.new("pymoe_spec **")
        self._remote = self.target._remote
        self.draft_max = draft_max
        self.k_max = k  # the fixed draft length, or the longest draft "auto" may choose
        self.rollback = rollback
        self.stop_reason: Optional[str] = None
        self._buf = ffi.new("pymoe_token[]", MAX_DRAFT + 1)
        self._n = ffi.new("int32_t *")
        self._stop = ffi.new("int32_t *")
        self._inspect = None
        self._fed = False
        self._learned = None
        try:
            with self._building(out, lib.pymoe_spec_free):
                with self.target._call() as target_ptr, self._draft_call(target_ptr) as draft_ptr:
                    self._run(lib.pymoe_spec_create, target_ptr, draft_ptr, params, out)
                self._own(out[0], lib.pymoe_spec_free, self.target, self.draft)
                for session in (self.target, self.draft):
                    if session is not None:
                        session._loops.add(self)  # closing a session closes this loop first
                # what auto learned over these models on this machine before (pymoe/learned.py)
                self._learned = learned.path_for(self, warm_start) if auto else None
                self.warm_started = self._learned is not None and learned.load(self._ptr, self._learned)
        except BaseException:
            self._close_owned()  # the sessions this loop made for itself
            raise

    @property
    def is_recurrent(self) -> bool:
        return self.target.is_recurrent

    @property
    def source(self) -> str:
        """Where drafts come from: "model", "mtp", "ngram", "model+ngram" or "mtp+ngram"."""
        return "+".join(name for name, on in (("model", self.draft is not None), ("mtp", self.mtp),
                                              ("ngram", self.ngram)) if on)

    def _draft_call(self, target_ptr):
        """The draft session's pointer, marked in use (NULL without one; the C library refuses a draft that is the
        target)."""
        if self.draft is None or self.draft is self.target:
            return contextlib.nullcontext(ffi.NULL if self.draft is None else target_ptr)
        return self.draft._call()

    @contextlib.contextmanager
    def _call(self, wait: bool = False):
        """The loop's pointer, with the loop and both sessions marked in use (BusyError, ClosedError otherwise)."""
        held = []
        try:
            for obj in (self, self.target, self.draft, self._grammar):
                if obj is not None:
                    obj._enter()
                    held.append(obj)
            for session in (self.target, self.draft):
                if session is not None:
                    session._stop[0] = 0  # a stop asked for before this call was for an earlier one
            yield self._ptr
        finally:
            for obj in reversed(held):
                obj._leave()

    def _interrupt(self) -> None:
        self.target._interrupt()
        if self.draft is not None:
            self.draft._interrupt()

    def _logits_moved(self) -> None:
        """The sessions' logits are about to change: views of them must go stale."""
        self.target._logits_epoch += 1
        if self.draft is not None:
            self.draft._logits_epoch += 1

    def _callback_failed(self) -> bool:
        return self._inspect is not None and self._inspect.error is not None

    def _raise_for(self, rc: int, detail=None) -> None:
        """The inspect callback's error first (the round ran to its end), then as the target session raises."""
        if self._callback_failed():
            error, self._inspect.error = self._inspect.error, None
            raise error
        self.target._raise_for(rc, detail)

    def _session(self, obj, params) -> Session:
        if isinstance(obj, Session):
            return obj
        if isinstance(obj, Model):
            session = obj.session(**params)
            self._owned.append(session)
            return session
        raise errors.InvalidArgumentError(f"expected a Model or a Session, got {type(obj).__name__}",
                                          lib.PYMOE_EINVAL)

    def _close_owned(self) -> None:
        for session in self._owned:
            session.close()
        self._owned = []

    def _before_close(self) -> None:
        if self._grammar is not None:  # free to constrain another loop
            self._grammar._loop = None
        if self._learned is not None:
            st = ffi.new("struct pymoe_spec_stats *", {"size": ffi.sizeof("struct pymoe_spec_stats")})
            if lib.pymoe_spec_stats(self._ptr, st) == lib.PYMOE_OK and st.rounds > 0:
                learned.save(self._ptr, self._learned)

    def close(self) -> None:
        super().close()  # the loop goes before the sessions it uses
        self._close_owned()

    def __repr__(self) -> str:
        if self.closed:
            return "<pymoe.Speculative closed>"
        return f"<pymoe.Speculative draft={self.source} draft_max={self.draft_max!r} position={self.target.position}>"

    # -- token-level control ----------------------------------------------
    def feed(self, prompt: Union[str, Tokens]) -> None:
        """Append text or tokens to the sequence (a prompt, or a later turn)."""
        if isinstance(prompt, str):
            prompt = self.target.model.tokenize(prompt, add_special=not self._fed)  # BOS only at the start
        try:
            arr = _token_array(prompt)
        except OverflowError:
            raise errors.TokenOutOfVocabularyError("a token id does not fit in int32", lib.PYMOE_ETOKEN) from None
        if arr.size == 0:
            raise errors.InvalidArgumentError("feed() needs at least one token", lib.PYMOE_EINVAL)
        self._c(lib.pymoe_spec_feed, ffi.from_buffer("pymoe_token[]", arr), arr.size, moves=True, long=True)
        self._fed = True

    def step(self, max_tokens: int = MAX_DRAFT + 1) -> List[int]:
        """One round: the token ids it emitted (the accepted drafts and one more).
        stop_reason says whether generation must end ("eog", "max_tokens",
        "context_full") or None; with set_logprobs, round_scores their Scores."""
        interrupt_on_ctrl_c()
        with self._call() as ptr:  # _c, spelled out: the outputs are read before another call can start
            self._logits_moved()
            rc, detail = run_c(lib.pymoe_spec_step, ptr, max_tokens, self._buf, MAX_DRAFT + 1, self._n, self._stop,
                               remote=self._remote is not None)
            emitted = [self._buf[i] for i in range(self._n[0])]
            stop = self._stop[0]
            if rc == 0 and self._scoring >= 0:
                scores, n = ffi.new("struct pymoe_logprob **"), ffi.new("int32_t *")
                lib.pymoe_spec_logprobs(ptr, scores, n)
                self.round_scores = [scores_from_c(scores[0][i]) for i in range(n[0])]
        self._status(rc, detail)
        self.stop_reason = STOP_REASONS[stop]
        return emitted

    @property
    def model(self) -> Model:
        """The target model (whose tokenizer the sequence uses)."""
        return self.target.model

    @property
    def n_ctx(self) -> int:
        """The target session's context size."""
        return self.target.n_ctx

    @property
    def position(self) -> int:
        """Tokens in the sequence, counting the newest, which the target evaluates with the next round."""
        with self._call() as ptr:
            return lib.pymoe_spec_position(ptr)

    @property
    def tokens(self) -> List[int]:
        """The sequence, oldest first: what was fed and emitted (a copy)."""
        return self._tokens_from(lib.pymoe_spec_tokens)

    @property
    def rewind_limit(self) -> int:
        """How many of the last tokens rewind() can drop now: all of them with a
        KV-cache target; for recurrent state, what its snapshots or the last
        drafting round's checkpoint reach."""
        with self._call() as ptr:
            return lib.pymoe_spec_rewind_limit(ptr)

    def rewind(self, n: int) -> None:
        """Drop the last n tokens of the sequence (at most rewind_limit; n =
        position is a reset) from both sessions, the lookup index and the MTP
        head; the newest token left waits for the next round, as after a feed."""
        if not isinstance(n, int) or isinstance(n, bool):
            raise errors.InvalidArgumentError(f"rewind needs an int, got {n!r}", lib.PYMOE_EINVAL)
        with self._call() as ptr:
            position = lib.pymoe_spec_position(ptr)
            if not 0 <= n <= position:
                raise errors.InvalidArgumentError(f"cannot rewind {n} tokens: the sequence has {position}",
                                                  lib.PYMOE_EINVAL)
            self._logits_moved()
            self._run(lib.pymoe_spec_rewind, ptr, position - n)
            self._fed = position - n > 0

    def save_state(self) -> bytearray:
        """The whole loop's state: the sequence, both sessions' states, the
        pending tokens and the MTP head's entries (the lookup index is rebuilt
        from the sequence; what auto has learned is not included: a loop that
        loads keeps its own). For load_state() of a loop over the same models,
        draft sources and session settings."""
        with self._call() as ptr:
            return self._save_bytes(lib.pymoe_spec_state_save, ptr)

    @property
    def state_size(self) -> int:
        return self._saved_size(lib.pymoe_spec_state_save)

    def load_state(self, state) -> None:
        """Go on from a saved loop state. Another model's, another draft
        source's or damaged bytes are an InvalidArgumentError (the loop
        unchanged when its target refuses them; empty when a later part does)."""
        with self._call() as ptr:
            self._logits_moved()
            try:
                self._run(lib.pymoe_spec_state_load, ptr, *self._bytes_in(state))
            finally:
                self._fed = lib.pymoe_spec_position(ptr) > 0

    @property
    def moe_cache(self) -> Optional[MoeCacheStats]:
        """The target session's expert cache counts (None without a cache)."""
        return self.target.moe_cache

    def reset(self) -> None:
        """Start a new sequence: both sessions are emptied (the statistics and
        what draft_max="auto" has learned are kept)."""
        self._c(lib.pymoe_spec_reset, moves=True)
        self._fed = False

    def set_sampling(self, sampling: SamplingParams, seed: Optional[int] = None) -> None:
        """Sample the next rounds with these settings (temperature 0 verifies
        greedily), the draws from seed (None: a random one); the sequence and
        what draft_max="auto" has learned stay."""
        if not isinstance(sampling, SamplingParams):
            raise errors.InvalidArgumentError(f"expected SamplingParams, got {type(sampling).__name__}",
                                              lib.PYMOE_EINVAL)
        self._c(lib.pymoe_spec_set_sampling, sampling.c_params, seed_or_random(seed))
        self._sampling = sampling

    takes_grammar = True

    def set_grammar(self, grammar: Optional[Grammar]) -> None:
        """Constrain the rounds from now on by grammar (None: no longer); it
        advances with every token the loop emits. generate_tokens sets and
        clears one for you."""
        if grammar is not None and not isinstance(grammar, Grammar):
            raise errors.InvalidArgumentError(f"expected a Grammar, got {type(grammar).__name__}", lib.PYMOE_EINVAL)
        if grammar is self._grammar:
            return
        old = self._grammar
        with self._call() as ptr:
            if grammar is not None:
                attach_grammar(self, grammar)
                with grammar._call() as grammar_ptr:
                    self._run(lib.pymoe_spec_set_grammar, ptr, grammar_ptr)
            else:
                self._run(lib.pymoe_spec_set_grammar, ptr, ffi.NULL)
            self._grammar = grammar
        if old is not None:
            old._loop = None

    def _detach_grammar(self, grammar: Grammar) -> None:
        """The grammar is closing (its lock held, so no round is running): the loop forgets it, under the loop's
        lock (a close of the loop on another thread waits; rounds never wait for the grammar's lock)."""
        with self._lock:
            if self._grammar is grammar:
                if self._ptr is not None:
                    lib.pymoe_spec_set_grammar(self._ptr, ffi.NULL)
                self._grammar = None
        grammar._loop = None

    def set_logprobs(self, n_top: Optional[int]) -> None:
        """Score the tokens of the next rounds (round_scores): each token's log
        probability and the n_top most likely, read from the verify row that
        chose it (what plain decoding reads there). None: no scoring, at no cost."""
        check_logprobs(n_top)
        n_top = -1 if n_top is None else n_top
        if n_top != self._scoring:
            self._c(lib.pymoe_spec_set_logprobs, n_top)
            self._scoring = n_top
        self.round_scores = []

    def generate_tokens(self, prompt: Union[str, Tokens, None] = None, *, max_tokens: int = 128,
                        grammar: Optional[Grammar] = None, logprobs: Optional[int] = None) -> Iterator[int]:
        """Feed the prompt (None continues), then yield token ids until max_tokens,
        end of generation or a full context (stop_reason says which). grammar
        constrains what is generated (without one, the loop's grammar or
        json_schema, if any, makes one). logprobs=n: self.scores is each
        yielded token's Scores (n alternatives) while it is the last yielded."""
        if max_tokens < 0:
            raise errors.InvalidArgumentError("max_tokens must be >= 0", lib.PYMOE_EINVAL)
        self.set_logprobs(logprobs)
        self.scores = None
        owner = self._scoring_owner = object()  # this generation's scoring: a generator finalized late leaves the next
        if grammar is None:
            grammar = self._sampling.constraint(self.model)
        if prompt is not None:
            self.feed(prompt)
        done = 0
        self.stop_reason = "max_tokens"
        if grammar is not None:  # else a grammar set with set_grammar (or none) stays
            self.set_grammar(grammar)
        try:
            while done < max_tokens:
                tokens = self.step(max_tokens - done)
                done += len(tokens)
                for i, token in enumerate(tokens):
                    if logprobs is not None:
                        self.scores = self.round_scores[i]
                    yield token
                if self.stop_reason is not None:
                    return
            self.stop_reason = "max_tokens"
        finally:  # this generation's grammar only (a generator finalized late must not take the next one's)
            if logprobs is not None and self._scoring_owner is owner and not self.closed:
                try:
                    self.set_logprobs(None)  # step() after it scores nothing unless asked
                except (errors.BusyError, errors.ClosedError):
                    pass
            if grammar is not None and self._grammar is grammar and not self.closed:
                try:
                    self.set_grammar(None)
                except (errors.BusyError, errors.ClosedError):
                    pass  # another thread's call: the grammar stays until the next set_grammar

    @property
    def stats(self) -> SpecStats:
        c = ffi.new("struct pymoe_spec_stats *", {"size": ffi.sizeof("struct pymoe_spec_stats")})
        self._c(lib.pymoe_spec_stats, c)
        by_n = {n: c.verify_seconds_by_n[n] / c.verify_count_by_n[n]
                for n in range(1, MAX_DRAFT + 2) if c.verify_count_by_n[n]}
        by_k = {k: c.rounds_by_k[k] for k in range(MAX_DRAFT + 1) if c.rounds_by_k[k]}
        return SpecStats(c.rounds, c.drafted, c.accepted, c.emitted, list(c.accepted_hist), c.draft_seconds,
                         c.verify_seconds, c.other_seconds, c.draft_sampling_seconds, c.target_sampling_seconds,
                         c.verifier_seconds, by_n, by_k, c.last_k, c.max_verify_batch, c.acceptance_estimate, c.gated_rounds,
                         ROLLBACK_NAMES[c.rollback_target], ROLLBACK_NAMES[c.rollback_draft], c.checkpoints,
                         c.restores, c.refed_tokens, c.rollback_seconds, c.checkpoint_bytes,
                         {n: LookupStats(c.lookup_matches[n], c.lookup_rounds[n], c.lookup_drafted[n],
                                         c.lookup_accepted[n])
                          for n in range(NGRAM_MAX + 1) if c.lookup_matches[n]},
                         list(c.depth_drafted), list(c.depth_accepted), c.mtp_seconds, c.mtp_tokens,
                         self.target.moe_cache)

    def set_inspect(self, callback: Optional[Callable[[List[int], np.ndarray, int, int], None]]) -> None:
        """Debugging: call callback(draft_tokens, target_logits, n_accepted, next)
        after each verification, with a copy of the verify batch's logits and
        the verifier's decision (the round emits draft_tokens[:n_accepted] + [next],
        cut before the first end-of-generation token)."""
        with self._call() as ptr:
            if callback is None:
                lib.pymoe_spec_set_inspect(ptr, ffi.NULL, ffi.NULL)
                self._inspect = self._inspect_handle = None
                return
            inspect = _Inspect(callback)
            handle = ffi.new_handle(inspect)
            lib.pymoe_spec_set_inspect(ptr, lib._pymoe_on_round, handle)
            self._inspect, self._inspect_handle = inspect, handle
