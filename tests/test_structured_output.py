"""Structured output (response_format): the grammar's token mask, checked against ``jsonschema``.

Oracles: ``jsonschema`` validates every completed answer (greedy decoding of random and bundled
models, and random walks that pick any token the grammar allows, which explore far more of the
grammar than a model does); the schema checker's error paths are the schema's own structure.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from aquilachat.errors import ValidationError
from aquilachat.llm import LLM
from aquilachat.sampling_params import SamplingParams, StructuredOutputs
from aquilachat.structured_output import (SUPPORTED_FORMATS, GrammarBackend, bitmask_to_bool, check_schema)
from tests.helpers import make_tiny_model

xgrammar = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

#: Schemas exercising every supported keyword; each bounds its answer's length, so greedy decoding
#: of any model must complete it.
BOUNDED = {
    "object": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"}, "tags": {"type": "array", "items": {"enum": ["a", "b", "中文"]}, "maxItems": 3}},
        "required": ["name", "age", "ok", "tags"], "additionalProperties": False},
    "pattern": {"type": "string", "pattern": "^[a-c]{2,4}$"},
    "number range": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "description": "ignored annotation"},
    "lengths": {"type": "string", "minLength": 2, "maxLength": 3},
    "items": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 3},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"const": "x"}],
                    "items": False},
    "enum and const": {"anyOf": [{"enum": ["a", 1, None, [1]]}, {"const": {"k": [1, "v"]}}]},
    "refs": {"definitions": {"point": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": 0, "maximum": 9}, "y": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"a": {"$ref": "#/definitions/point"}, "b": {"$ref": "#/definitions/point"}},
        "required": ["a", "b"], "additionalProperties": False},
    "multipleOf": {"type": "integer", "multipleOf": 7, "minimum": -50, "maximum": 50},
    "properties counts": {"type": "object", "minProperties": 1, "maxProperties": 2,
                          "patternProperties": {"^x[a-z]?$": {"type": "null"}}, "additionalProperties": False},
    "types": {"type": ["integer", "null"], "minimum": -3, "maximum": 3},
    "bounded formats": {"type": "array", "prefixItems": [{"type": "string", "format": f}
                                                         for f in ("date", "ipv4", "ipv6", "uuid")],
                        "items": False, "minItems": 4},
}
#: Schemas whose answers a model may never finish (recursion): random walks only.
UNBOUNDED = {
    "recursive refs": {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer", "minimum": 0, "maximum": 9},
        "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["v", "next"],
        "additionalProperties": False}}, "$ref": "#/$defs/node"},
    "any JSON": {},
    "formats": {"type": "array", "prefixItems": [{"type": "string", "format": f} for f in sorted(SUPPORTED_FORMATS)],
                "items": False, "minItems": len(SUPPORTED_FORMATS)},
}
#: Formats whose every grammar-made string also passes jsonschema's format checker (the others
#: follow the syntax, not the calendar; see the module docstring of aquilachat.structured_output),
#: those of them the installed checker knows (hostname and duration need extra packages).
CHECKED_FORMATS = {"email", "hostname", "ipv6", "uuid", "duration"} & set(jsonschema.FormatChecker.checkers)


@pytest.fixture(scope="module")
def tokenizer(byte_tokenizer_dir):
    from aquilachat.tokenizer import Tokenizer
    return Tokenizer.from_dir(byte_tokenizer_dir)


@pytest.fixture(scope="module")
def backend(tokenizer) -> GrammarBackend:
    return GrammarBackend.for_tokenizer(tokenizer, tokenizer.vocab_size, [tokenizer.eos_token_id])


def _validate(text: str, schema: dict) -> None:
    value = json.loads(text)  # strict: no raw control characters
    jsonschema.validate(value, schema)
    checker = jsonschema.FormatChecker(formats=CHECKED_FORMATS)
    jsonschema.validate(value, schema, format_checker=checker)


def _walk(grammar, tokenizer, rng: random.Random, max_steps: int = 2000) -> str | None:
    """Pick random allowed tokens until the grammar ends (then the text), or None after max_steps."""
    constraint = grammar.constraint()
    V = grammar.vocab_size
    bitmask = torch.zeros(1, (V + 31) // 32, dtype=torch.int32)
    out: list[int] = []
    eos = tokenizer.eos_token_id
    for _ in range(max_steps):
        constraint.fill_bitmask(bitmask, 0)
        ids = bitmask_to_bool(bitmask, V)[0].nonzero()[:, 0].tolist()
        token = eos if eos in ids and rng.random() < 0.5 else rng.choice(ids)
        assert constraint.accept(token)
        if constraint.terminated:
            return tokenizer.decode(out)
        out.append(token)
    return None


def test_bitmask_to_bool_is_xgrammars_layout():
    V = 70
    want = torch.rand(2, V) < 0.5
    words = torch.zeros(2, 3, dtype=torch.int64)
    for b in range(2):
        for i in range(V):
            if want[b, i]:
                words[b, i // 32] |= 1 << (i % 32)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    assert torch.equal(bitmask_to_bool(words, V), want)


@pytest.mark.parametrize("name", list(BOUNDED) + list(UNBOUNDED))
def test_random_walks_through_each_schema_validate(name, backend, tokenizer):
    """Any token sequence the grammar allows is valid JSON for the schema: the measurement behind
    SUPPORTED_KEYWORDS (keywords xgrammar does not enforce are refused, see the next test)."""
    schema = {**BOUNDED, **UNBOUNDED}[name]
    rng = random.Random(0)
    for strict in (True, False):
        grammar = backend.compile(StructuredOutputs(json=schema, strict=strict))
        texts = [_walk(grammar, tokenizer, rng) for _ in range(12)]
        assert sum(t is not None for t in texts) >= 10
        for text in filter(None, texts):
            _validate(text, schema)


@pytest.mark.parametrize("schema,path", [
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "S.properties.a.not"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "S.oneOf"),
    ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "S.uniqueItems"),
    ({"type": "number", "multipleOf": 0.5}, "S.multipleOf"),
    ({"type": "object", "propertyNames": {"maxLength": 2}}, "S.propertyNames"),
    ({"allOf": [{"type": "string"}]}, "S.allOf"),
    ({"type": "string", "format": "weird"}, "S.format"),
    ({"$defs": {"x": {"if": {"type": "string"}}}, "$ref": "#/$defs/x"}, "S.$defs.x.if"),
    ({"type": "object", "properties": {"a": {"type": "strin"}}}, "S.properties.a.type"),
    ({"$ref": "https://example.com/schema.json"}, "S.$ref"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}}}, "S.properties.a"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(unclosed"}}}, "S.properties.a"),
    ({"type": "object", "properties": {"b": {"$ref": "#/$defs/missing"}}}, "S.properties.b"),
])
def test_unsupported_or_uncompilable_schemas_name_their_path(schema, path, backend):
    with pytest.raises(ValidationError) as info:
        backend.compile(StructuredOutputs(json=schema), where="S")
    assert info.value.field == "response_format"
    assert str(info.value).startswith(path + ":") or str(info.value).startswith(path + "."), str(info.value)


def test_check_schema_walks_every_subschema():
    check_schema({"type": "object", "title": "t", "properties": {"a": {"type": "string", "default": "x"}}}, "S")
    for schema, path in (({"type": "array", "prefixItems": [{"oneOf": [{}]}]}, r"S\.prefixItems\.0\.oneOf"),
                         ({"type": "object", "patternProperties": {"^x": {"not": {}}}}, r"S\.patternProperties\.\^x\.not"),
                         ({"items": {"additionalProperties": {"allOf": []}}}, r"S\.items\.additionalProperties\.allOf"),
                         ({"properties": {"a": {"minLength": -1}}}, r"S\.properties\.a\.minLength")):
        with pytest.raises(ValidationError, match="^" + path + ":"):
            check_schema(schema, "S")


def test_strict_forbids_properties_the_schema_does_not_name(backend, tokenizer):
    """OpenAI's strict: true -> additionalProperties defaults to false; false -> JSON Schema's
    default (extra properties allowed)."""
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "maxProperties": 2}
    rng = random.Random(1)
    walks = {strict: [json.loads(t) for t in (_walk(backend.compile(StructuredOutputs(json=schema, strict=strict)),
                                                    tokenizer, rng) for _ in range(40)) if t is not None]
             for strict in (True, False)}
    assert all(set(v) <= {"a"} for v in walks[True])
    assert any(set(v) - {"a"} for v in walks[False])


@pytest.mark.parametrize("seed", [0, 1])
def test_greedy_answers_of_random_models_validate(seed, tmp_path, byte_tokenizer_dir):
    """Every bounded schema x three prompts, greedy, all in one continuous batch (each answer with
    its own grammar): every answer completes, parses and validates."""
    make_tiny_model(tmp_path, byte_tokenizer_dir, seed=seed, max_position_embeddings=512)
    llm = LLM(tmp_path, device="cpu", max_num_seqs=16)
    prompts = [llm.encode_chat([{"role": "user", "content": q}]) for q in ("Describe a person as JSON.", "你好", "x")]
    seqs = []
    for name, schema in BOUNDED.items():
        params = SamplingParams(temperature=0, max_tokens=200, structured_outputs=StructuredOutputs(json=schema))
        grammar = llm.grammar_backend.compile(params.structured_outputs)
        seqs += [(name, llm.engine.add(ids, params, constraint=grammar.constraint())) for ids in prompts]
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=200,  # sampling, not only greedy
                            structured_outputs=StructuredOutputs(json=BOUNDED["object"], strict=True))
    grammar = llm.grammar_backend.compile(params.structured_outputs)
    seqs += [("object", llm.engine.add(prompts[0], params, seed_offset=i, constraint=grammar.constraint()))
             for i in range(4)]
    while llm.engine.has_unfinished():
        llm.engine.step()
    for name, seq in seqs:
        text = llm.tokenizer.decode(seq.output_ids[:-1], skip_special_tokens=True)  # the end token last
        assert seq.finish_reason == "stop" and seq.output_ids[-1] == llm.tokenizer.eos_token_id, (name, text)
        _validate(text, BOUNDED[name])
    out = llm.chat([{"role": "user", "content": "x"}], SamplingParams(
        temperature=0, max_tokens=200, structured_outputs=StructuredOutputs(json_object=True)))[0]
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)


def test_bundled_model_answers_in_the_schema_despite_its_turn_separator():
    """The bundled model writes the template's "###" inside JSON strings; with a response format
    the template's stop strings do not cut the answer (the grammar ends it)."""
    llm = LLM("aquila-tiny", device="cpu", max_num_seqs=4)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    params = SamplingParams(temperature=0, max_tokens=100, structured_outputs=StructuredOutputs(json=schema))
    outs = llm.chat([[{"role": "user", "content": q}] for q in ("Who are you?", "你好", "Tell me a joke")], params)
    for out in outs:
        assert out.finish_reason == "stop"
        _validate(out.text, schema)
    assert any("###" in out.text for out in outs)


def test_min_tokens_ends_no_answer_early_with_the_bundled_model():
    """A model that ends its turn at once (" ###", an empty answer) must not do so with min_tokens:
    the end token and the tokens that would start a stop string are held back. The first token of
    the template's "###" is given a logit bias so that the bundled model ends at once often."""
    llm = LLM("aquila-tiny", device="cpu", max_num_seqs=16)
    messages = [{"role": "user", "content": "你好"}]
    first = llm.tokenizer.encode("###")[0]  # "##" (then "#")
    assert llm.tokenizer.decode([first]) == "##"
    base = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=8, n=30, seed=0, logit_bias={first: 6.0})
    plain = llm.chat(messages, base)[0].outputs
    assert sum(not o.text.strip() for o in plain) >= 3  # empty answers without min_tokens
    held = llm.chat(messages, base.replace(min_tokens=3))[0].outputs
    for out in held:
        assert len(out.token_ids) >= 3 and out.text.strip() and "###" not in out.text
