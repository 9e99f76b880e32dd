"""What the provider mocks answer when a request fixes the answer's shape (structured outputs, a
tool's input schema): a small JSON value valid against the JSON Schema, as the real APIs guarantee
with constrained decoding. Checked with jsonschema-rs, so a mock never answers outside the schema."""
from __future__ import annotations

import jsonschema_rs

TOOL_ARGS = {"location": "Berkeley, CA", "unit": "c"}   # the mocks' usual tool arguments, where the schema takes them

_STRINGS = {"date-time": "2025-01-02T03:04:05Z", "date": "2025-01-02", "time": "03:04:05Z", "email": "ada@lbl.gov",
            "uri": "https://lbl.gov/", "uuid": "123e4567-e89b-12d3-a456-426614174000", "hostname": "lbl.gov",
            "ipv4": "127.0.0.1", "ipv6": "::1", "duration": "P1D"}


def _resolve(schema: dict, root: dict) -> dict:
    ref = schema.get("$ref")
    while isinstance(ref, str) and ref.startswith("#"):
        node = root
        for part in ref.lstrip("#/").split("/") if ref != "#" else ():
            node = node[part]
        schema = {**node, **{k: v for k, v in schema.items() if k != "$ref"}}
        ref = node.get("$ref")
    return schema


def _value(schema, root: dict, depth: int = 0):
    if not isinstance(schema, dict) or depth > 8:
        return None
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            variants = [_resolve(v, root) for v in schema[key]]
            best = next((v for v in variants if v.get("type") != "null"), variants[0])
            return _value(best, root, depth + 1)
    if schema.get("allOf"):
        merged: dict = {}
        for part in schema["allOf"]:
            merged.update(_resolve(part, root))
        return _value(merged, root, depth + 1)
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), t[0] if t else None)
    if t == "object" or (t is None and "properties" in schema):
        props = schema.get("properties") or {}
        return {k: _value(v, root, depth + 1) for k, v in props.items()}
    if t == "array":
        n = max(1, schema.get("minItems", 1))
        return [_value(schema.get("items") or {"type": "string"}, root, depth + 1) for _ in range(n)]
    if t == "string":
        s = _STRINGS.get(schema.get("format"), "mock")
        return (s * max(1, schema.get("minLength", 0)))[:schema.get("maxLength", len(s) * 64)] or s
    if t == "integer":
        return int(schema.get("minimum", 1))
    if t == "number":
        return float(schema.get("minimum", 1.5))
    if t == "boolean":
        return True
    if t == "null":
        return None
    return "mock"


def instance(schema: dict) -> object:
    """A value valid against `schema` (an AssertionError if the schema is beyond this mock)."""
    value = _value(schema, schema)
    assert jsonschema_rs.validator_for(schema).is_valid(value), (schema, value)
    return value


def tool_args(schema: dict | None) -> dict:
    """The arguments a mock's tool call carries: TOOL_ARGS where the schema takes them, else an instance."""
    schema = schema or {"type": "object", "properties": {}}
    if not schema.get("properties"):
        return {}
    if jsonschema_rs.validator_for(schema).is_valid(TOOL_ARGS):
        return TOOL_ARGS
    return instance(schema)
