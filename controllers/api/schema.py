"""Turns a pydantic model's JSON schema into a Kubernetes structural OpenAPI v3 schema.

kube-custom-resource resolves ``$ref``s and strips titles, but lets a referenced model's
docstring overwrite the description of the field that uses it and leaves ``Optional`` fields as
``anyOf [X, null]``, which is not structural. This pass fixes both: the field's own description
wins, and an optional field is simply an absent one.
"""

from __future__ import annotations

import typing as t

from kube_custom_resource.schema import schema_apply
from pydantic import BaseModel

JsonSchema = dict[str, t.Any]


def _merge_ref(node: JsonSchema, definitions: dict[str, JsonSchema]) -> JsonSchema:
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node["allOf"][0], **{k: v for k, v in node.items() if k != "allOf"}}
    if "$ref" in node:
        target = definitions[node["$ref"].removeprefix("#/$defs/")]
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        node = {**target, **siblings}
        if "x-kubernetes-validations" in target and "x-kubernetes-validations" in siblings:
            node["x-kubernetes-validations"] = target["x-kubernetes-validations"] + siblings["x-kubernetes-validations"]
        return _merge_ref(node, definitions)
    return node


def _default_empty_collections(node: JsonSchema) -> JsonSchema:
    """Optional lists and maps default to empty, as in the models (pydantic leaves ``default_factory``
    out of JSON schemas); CEL rules can then iterate them without ``has()`` guards."""
    required = set(node.get("required", ()))
    for name, prop in node.get("properties", {}).items():
        if name in required or "default" in prop:
            continue
        if prop.get("type") == "array":
            prop["default"] = []
        elif prop.get("type") == "object" and isinstance(prop.get("additionalProperties"), dict):
            prop["default"] = {}
    return node


def _drop_null(node: JsonSchema) -> JsonSchema:
    options = node.get("anyOf")
    if options and any(option.get("type") == "null" for option in options):
        rest = [option for option in options if option.get("type") != "null"]
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        node = {**rest[0], **outer} if len(rest) == 1 else {**outer, "anyOf": rest}
    if "default" in node and node["default"] is None:
        node = {k: v for k, v in node.items() if k != "default"}
    node.pop("title", None)
    return _default_empty_collections(node)


def structural_schema(model: type[BaseModel]) -> JsonSchema:
    """The openAPIV3Schema for ``model``: refs inlined, no nulls, no titles, defaults kept (empty for
    optional lists and maps)."""
    raw = BaseModel.model_json_schema.__func__(model, by_alias=True)  # type: ignore[attr-defined]
    definitions = raw.pop("$defs", {})
    # Definitions may refer to each other; resolve them before inlining.
    resolved = schema_apply(raw, lambda node: _merge_ref(node, definitions), pre=True)
    return schema_apply(resolved, _drop_null)
