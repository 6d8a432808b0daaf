"""Constrained decoding (pymoe.grammar, csrc/grammar.cpp, the loop's
verify_constrained): a GBNF grammar or a JSON schema constrains plain
sessions and every speculative draft source; greedy constrained speculation
gives plain constrained decoding's tokens, sampled constrained speculation
follows the constrained distribution (the joint of the first two tokens),
outputs parse and match their schema, and bad constraints are errors naming
what is wrong."""
import json

import numpy as np
import pytest

import pymoe
from pymoe import errors
from pymoe.grammar import Grammar

pytestmark = pytest.mark.slow

EXACT = dict(n_ctx=512, flash_attn="off", cache_type_k="f32", cache_type_v="f32", n_threads=2)
GREEDY = pymoe.SamplingParams.greedy()
BERNSTEIN_T = 21.0  # as tests/test_verify.py: a correct loop exceeds the bound with probability ~1e-9 per cell

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "score": {"type": "number"},
    "role": {"enum": ["admin", "a \"quoted\" user", "back\\slash", "two\nlines", "caf\u00e9"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                 "zip": {"type": "integer"}},
                "required": ["city"], "additionalProperties": False}},
    "required": ["name", "age", "score", "role", "tags", "address"], "additionalProperties": False}
LIST = {"type": "array", "items": {"enum": [1, 2, 3, "four", None, True]}, "minItems": 1, "maxItems": 5}
WORDS = 'root ::= ("yes" | "no" | "maybe") " " [0-9] [0-9]? "."'


def plain(model, prompt, sampling, n=160, seed=0):
    with model.session(sampling=sampling, seed=seed, **EXACT) as s:
        out = list(s.generate_tokens(prompt, max_tokens=n))
        return out, s.stop_reason


def speculative(model, draft, prompt, n=160, seed=0, **kw):
    with pymoe.Speculative(model, draft, seed=seed, **EXACT, **kw) as spec:
        out = list(spec.generate_tokens(prompt, max_tokens=n))
        return out, spec.stop_reason, spec.stats


def conforms(value, schema) -> bool:
    """Enough of JSON Schema for PERSON and LIST: types, enums, bounds, required, no extra keys."""
    if "enum" in schema:
        return any(value == e and type(value) is type(e) for e in schema["enum"])
    kind = schema.get("type")
    if kind == "object":
        props = schema.get("properties", {})
        return (isinstance(value, dict) and all(k in value for k in schema.get("required", []))
                and all(k in props and conforms(v, props[k]) for k, v in value.items()))
    if kind == "array":
        return (isinstance(value, list) and schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", 1e9)
                and all(conforms(v, schema["items"]) for v in value))
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", 1e9)
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)
                and schema.get("minimum", -1e18) <= value <= schema.get("maximum", 1e18))
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    raise AssertionError(f"the test's checker does not know {schema}")


# ---- the same output with and without speculation --------------------------

@pytest.mark.parametrize("constraint", [dict(json_schema=PERSON), dict(json_schema=LIST), dict(grammar=WORDS)])
def test_greedy_constrained_speculation_is_plain_constrained_decoding_for_every_draft_source(pair_target, pair_draft,
                                                                                               pair_mtp, constraint):
    sampling = pymoe.SamplingParams(temperature=0, **constraint)
    want, why = plain(pair_target, "Answer:", sampling)
    assert why == "eog"  # the constraint ended the generation
    text = pair_target.detokenize(want)
    if "json_schema" in constraint:
        assert conforms(json.loads(text), constraint["json_schema"]), text
    drafted = 0
    for source, kw in ((pair_draft, dict(draft_max=3)), (pair_draft, dict(draft_max="auto")), ("ngram", {}),
                       (pair_draft, dict(ngram=True))):
        got, why, stats = speculative(pair_target, source, "Answer:", temperature=0, **constraint, **kw)
        assert (got, why) == (want, "eog"), (source, kw)
        drafted += stats.drafted
    want, _ = plain(pair_mtp, "Answer:", sampling)
    for k in (2, "auto"):
        got, _, stats = speculative(pair_mtp, "mtp", "Answer:", temperature=0, draft_max=k, **constraint)
        assert got == want
        drafted += stats.drafted
    assert drafted > 0 or len(want) < 20  # short answers: every draft may have been cut


def test_drafts_the_grammar_forbids_are_cut_and_a_constraint_ending_mid_round_ends_the_generation(pair_target,
                                                                                                   pair_draft):
    grammar = 'root ::= "ab ab ab ab ab"'  # the draft would go on; the grammar is complete after it
    want, why = plain(pair_target, "ab ab ab ab ab ab ab ab ab", pymoe.SamplingParams(temperature=0, grammar=grammar))
    assert (pair_target.detokenize(want), why) == ("ab ab ab ab ab", "eog")
    rounds = []
    with pymoe.Speculative(pair_target, "ngram", temperature=0, grammar=grammar, draft_max=8, **EXACT) as spec:
        spec.set_inspect(lambda drafts, logits, n_acc, nxt: rounds.append((list(drafts), n_acc, nxt)))
        got = list(spec.generate_tokens("ab ab ab ab ab ab ab ab ab", max_tokens=40))
        assert (got, spec.stop_reason) == (want, "eog")
    allowed = set(want) | {t for t in range(pair_target.info.n_vocab) if pair_target.is_eog(t)}
    assert all(set(d) <= allowed for d, _, _ in rounds)  # only what the grammar allows reached the batch
    assert any(len(d) > 0 for d, _, _ in rounds)


# ---- sampled: the constrained distribution ---------------------------------

def within_bound(freq, prob, n):
    t = BERNSTEIN_T
    return np.all(np.abs(freq - prob) <= np.sqrt(2 * prob * (1 - prob) * t / n) + 2 * t / (3 * n))


def test_the_constrained_distribution_is_the_kept_tokens_the_grammar_allows_renormalized(pair_target):
    with pair_target.session(**EXACT) as s:
        s.feed(pair_target.tokenize("Answer:"))
        row = s.logits().copy()
    for sampling in (pymoe.SamplingParams(temperature=1.3, top_k=0, top_p=1.0, min_p=0.0),
                     pymoe.SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
                     pymoe.SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0)):
        with Grammar.from_gbnf(pair_target, WORDS) as g:
            got = g.probs(row, sampling)
            kept = sampling.probs(row)
            allowed = np.array([p > 0 and g.allows(t) for t, p in enumerate(kept)])
            if (kept * allowed).sum() > 0:
                want = kept * allowed / (kept * allowed).sum()
            else:  # none of the kept tokens is allowed: the transforms of the masked row
                masked = row.copy()
                g.mask(masked)
                want = sampling.probs(masked)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
            assert all(g.allows(t) for t in np.flatnonzero(got))
            greedy = g.probs(row, GREEDY)
            assert greedy.sum() == 1.0 and g.allows(int(np.argmax(greedy)))
            masked = row.copy()
            g.mask(masked)
            assert int(np.argmax(greedy)) == int(np.argmax(masked))


@pytest.mark.parametrize("rank", [50, 300, 3000, 20000])  # below the kept tokens (at most 40)
def test_the_distribution_is_the_masked_rows_wherever_the_allowed_tokens_rank(pair_target, rank):
    """Where the kept tokens hold nothing allowed, greedy and top-k look among the most likely 64, 512, ...
    tokens (64 k, 512 k, ... for top-k) before masking the whole row: the same distribution either way."""
    rng = np.random.default_rng(rank)
    with Grammar.from_gbnf(pair_target, WORDS) as g:
        allowed = [t for t in range(pair_target.info.n_vocab) if g.allows(t)]
        for trial in range(3):
            row = rng.normal(0, 2, pair_target.info.n_vocab).astype(np.float32)
            order = np.argsort(-row, kind="stable")
            for j, t in enumerate(allowed):  # the allowed tokens from this rank on, among the rest
                row[t] = row[order[rank + 3 * j]] if rank + 3 * j < row.size else -50.0
            masked = row.copy()
            g.mask(masked)
            for sampling in (GREEDY, pymoe.SamplingParams(temperature=1.0, top_k=1, top_p=1.0, min_p=0.0),
                             pymoe.SamplingParams(temperature=0.7, top_k=3, top_p=0.9, min_p=0.0),
                             pymoe.SamplingParams()):
                np.testing.assert_allclose(g.probs(row, sampling), sampling.probs(masked), rtol=1e-5, atol=1e-7,
                                           err_msg=f"{sampling} rank {rank}")


def joint_of_first_two(model, prompt, grammar, sampling):
    """The exact joint distribution of the first two tokens under the grammar, from plain sessions."""
    joint = {}
    with model.session(**EXACT) as s:
        s.feed(model.tokenize(prompt))
        with Grammar.from_gbnf(model, grammar) as g:
            first = g.probs(s.logits(), sampling)
        for t1 in np.flatnonzero(first):
            s.feed(int(t1))
            with Grammar.from_gbnf(model, grammar) as g:
                g.accept(int(t1))
                second = g.probs(s.logits(), sampling)
            s.rewind(1)
            for t2 in np.flatnonzero(second):  # an end of generation is not emitted: one token then
                key = (int(t1),) if model.is_eog(int(t2)) else (int(t1), int(t2))
                joint[key] = joint.get(key, 0.0) + float(first[t1]) * float(second[t2])
    return joint


@pytest.mark.parametrize("source", ["model", "ngram"])
def test_sampled_constrained_speculation_draws_the_first_two_tokens_from_the_constrained_joint(pair_target, pair_draft,
                                                                                                source):
    grammar = 'root ::= (" " [a-e]) (" " [a-e]) (" " [a-e]) (" " [a-e])'  # the copy lookup drafts is allowed
    prompt = "a b c d e a b c d e a b c d e"  # the lookup source finds matches
    sampling = pymoe.SamplingParams(temperature=1.5, top_k=0, top_p=1.0, min_p=0.0)
    joint = joint_of_first_two(pair_target, prompt, grammar, sampling)
    n = 400  # each run masks rows of 32,000 tokens: a loose bound, and the support exactly
    counts = {}
    with pymoe.Speculative(pair_target, pair_draft if source == "model" else "ngram", draft_max=3, temperature=1.5,
                           top_k=0, top_p=1.0, min_p=0.0, grammar=grammar, **EXACT) as spec:
        for seed in range(n):
            spec.reset()
            spec.set_sampling(spec._sampling, seed=seed)
            out = list(spec.generate_tokens(prompt, max_tokens=3))
            counts[tuple(out[:2])] = counts.get(tuple(out[:2]), 0) + 1
        assert spec.stats.drafted > 0 and spec.stats.accepted > 0
    assert set(counts) <= set(joint)  # nothing the grammar forbids
    keys = sorted(joint)
    freq = np.array([counts.get(k, 0) / n for k in keys])
    assert within_bound(freq, np.array([joint[k] for k in keys]), n)


@pytest.mark.parametrize("schema", [PERSON, LIST])
def test_every_sampled_output_parses_and_matches_its_schema(pair_target, pair_draft, schema):
    sampling = pymoe.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, json_schema=schema)
    texts = []
    for seed in range(5):
        out, why = plain(pair_target, "JSON:", sampling, n=400, seed=seed)
        assert why == "eog"
        texts.append(pair_target.detokenize(out))
    with pymoe.Speculative(pair_target, pair_draft, draft_max=3, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                           json_schema=schema, **EXACT) as spec:
        for seed in range(5):
            spec.reset()
            spec.set_sampling(spec._sampling, seed=seed)
            texts.append(pair_target.detokenize(list(spec.generate_tokens("JSON:", max_tokens=400))))
            assert spec.stop_reason == "eog"
    for text in texts:
        assert conforms(json.loads(text), schema), text
    if schema is PERSON:  # escapes, in the enum's strings at least
        assert any("\\" in t for t in texts), texts


# ---- errors and lifetimes --------------------------------------------------

@pytest.mark.parametrize("kw, words", [(dict(grammar="root ::= ("), "grammar"),
                                       (dict(json_schema="{not json"), "not JSON"),
                                       (dict(json_schema=[1, 2]), "object"),
                                       (dict(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nope"}}}),
                                        "the grammar"),
                                       (dict(grammar="root ::= \"a\"", json_schema={}), "not both")])
def test_a_bad_grammar_or_schema_is_an_error_naming_it(pair_target, kw, words):
    with pytest.raises(errors.InvalidArgumentError, match=words):
        s = pymoe.SamplingParams(**kw)
        with pair_target.session(sampling=s, **EXACT) as session:
            list(session.generate_tokens("x", max_tokens=4))


def test_a_grammar_closed_while_it_constrains_a_loop_is_let_go_first(pair_target):
    with pymoe.Speculative(pair_target, "ngram", temperature=0, **EXACT) as spec:
        g = Grammar.from_gbnf(pair_target, WORDS)
        spec.feed("Answer:")
        spec.set_grammar(g)
        first = spec.step(2)
        g.close()  # the loop forgets it: the next rounds are unconstrained, never freed memory
        spec.step(2)
        with pytest.raises(errors.ClosedError):
            spec.set_grammar(g)
        assert first and g.closed
    other = Grammar.from_gbnf(pair_target, WORDS)
    with pymoe.Speculative(pair_target, "ngram", **EXACT) as a, pymoe.Speculative(pair_target, "ngram", **EXACT) as b:
        a.set_grammar(other)
        with pytest.raises(errors.BusyError):
            b.set_grammar(other)
    other.close()


def test_a_grammar_or_schema_deep_enough_to_end_the_process_is_an_error(pair_target):
    """llama.cpp's grammar code and the schema converter recurse per level: 100,000 levels ended the process."""
    from pymoe._native import ffi, lib
    deep = 100000
    for gbnf, words in (("root ::= " + "(" * deep + '"a"' + ")" * deep, "nests groups"),
                        ("root ::= r1\n" + "".join(f"r{i} ::= r{i + 1}\n" for i in range(1, deep)) + f'r{deep} ::= "a"',
                         "rules")):
        with pytest.raises(errors.InvalidArgumentError, match=words):
            Grammar.from_gbnf(pair_target, gbnf)
    out = ffi.new("pymoe_grammar **")
    text = b'{"json_schema": ' + b'{"items": ' * deep + b"{}" + b"}" * deep + b"}"  # past Python's own JSON limit
    with pair_target._call(wait=True) as ptr:
        assert lib.pymoe_grammar_create(ptr, text, out) == lib.PYMOE_EINVAL
    assert "nests deeper" in ffi.string(lib.pymoe_last_error()).decode()
    with Grammar.from_gbnf(pair_target, "root ::= " + "(" * 150 + '"a"' + ")" * 150) as g:  # deep, within the bounds
        probs = g.probs(np.zeros(pair_target.info.n_vocab, np.float32), GREEDY)
        assert pair_target.token_piece(int(np.argmax(probs))) == b"a"


def test_a_generation_finished_late_leaves_the_next_ones_grammar(pair_target):
    with pymoe.Speculative(pair_target, "ngram", temperature=0, **EXACT) as spec:
        first = spec.generate_tokens("Answer:", max_tokens=4, grammar=Grammar.from_gbnf(pair_target, WORDS))
        next(first)
        second = Grammar.from_gbnf(pair_target, WORDS)
        spec.set_grammar(second)
        first.close()  # its finally runs now, after the next grammar was set
        assert spec._grammar is second
        spec.set_grammar(None)
        assert second._loop is None
        with pymoe.Speculative(pair_target, "ngram", **EXACT) as other:
            other.set_grammar(second)  # free for another loop once let go
    assert second._loop is None  # and a closed loop lets go of its grammar
    second.close()
