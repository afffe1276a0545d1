"""The pydantic -> structural schema pass, on small models written for the purpose."""

from __future__ import annotations

import typing as t

from pydantic import ConfigDict, Field

from controllers.api.schema import structural_schema
from controllers.api.v1alpha1.common import IMMUTABLE, Model, Rule, rules


class Ref(Model):
    """Docstring of the referenced model."""

    name: str = Field(description="Name.")


class Sample(Model):
    model_config = ConfigDict(json_schema_extra=rules(Rule("self.a <= self.b", "a must not exceed b")))

    a: int = Field(1, description="A.")
    b: int = Field(2, description="B.")
    parent: Ref = Field(description="The field's own words.")
    pinned: t.Annotated[Ref, IMMUTABLE] = Field(description="Immutable reference.")
    optional_ref: Ref | None = Field(None, description="Optional reference.")
    optional_text: str | None = Field(None, description="Optional text.")
    tags: list[str] = Field(default_factory=list, description="Tags.")
    labels: dict[str, str] = Field(default_factory=dict, description="Labels.")


def test_field_description_wins_over_the_referenced_models_docstring():
    schema = structural_schema(Sample)
    assert schema["properties"]["parent"]["description"] == "The field's own words."
    assert schema["properties"]["parent"]["properties"]["name"]["description"] == "Name."


def test_optional_fields_are_absent_not_null():
    props = structural_schema(Sample)["properties"]
    for name in ("optionalRef", "optionalText"):
        assert "anyOf" not in props[name] and "default" not in props[name] and "nullable" not in props[name]
    assert props["optionalRef"]["type"] == "object"
    assert props["optionalText"]["type"] == "string"


def test_a_rule_on_one_use_of_a_model_stays_on_that_use():
    props = structural_schema(Sample)["properties"]
    assert props["pinned"]["x-kubernetes-validations"] == [
        {"rule": "self == oldSelf", "message": "is immutable", "reason": "FieldValueForbidden"}]
    assert "x-kubernetes-validations" not in props["parent"]
    assert "x-kubernetes-validations" not in props["optionalRef"]


def test_model_rules_defaults_and_titles():
    schema = structural_schema(Sample)
    assert schema["x-kubernetes-validations"] == [{"rule": "self.a <= self.b", "message": "a must not exceed b"}]
    assert schema["properties"]["a"]["default"] == 1
    assert "title" not in schema and "title" not in schema["properties"]["a"]
    assert set(schema["required"]) == {"parent", "pinned"}


def test_optional_collections_default_to_empty():
    props = structural_schema(Sample)["properties"]
    assert props["tags"]["default"] == []
    assert props["labels"]["default"] == {}
