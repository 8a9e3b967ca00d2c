import json
import math
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from stream_scorer.contracts.manifest import (
    FeatureSpec,
    Manifest,
    ValuePolicy,
    manifest_from_dict,
    manifest_json_schema,
    read_manifest,
    write_manifest,
)
from stream_scorer.errors import ModelError
from stream_scorer.stages.features import FEATURE_REASONS, FeatureBuilder

NAN, INF = math.nan, math.inf
PASS, DEAD = "pass", "dead_letter"


def spec(transform: str = "number", **kw: Any) -> FeatureSpec:
    cats = ("A", "B") if transform == "category" else ()
    return FeatureSpec("f", "v", transform, cats, **kw)


def manifest(*features: FeatureSpec, **kw: Any) -> Manifest:
    return Manifest("v1", "model.ubj", "0" * 64, "binary:logistic", features, "3.2.0", **kw)


# (feature, manifest-wide policy, value, expected float or reason code)
CASES: list[tuple[str, FeatureSpec, ValuePolicy, Any, float | str]] = [
    # defaults: missing and NaN pass as NaN, infinities dead-letter, range only when set
    ("missing default", spec(), ValuePolicy(), None, NAN),
    ("nan default", spec(), ValuePolicy(), NAN, NAN),
    ("+inf default", spec(), ValuePolicy(), INF, "non_finite"),
    ("-inf default", spec(), ValuePolicy(), -INF, "non_finite"),
    ("beyond float32", spec(), ValuePolicy(), 1e300, "non_finite"),
    ("huge int", spec(), ValuePolicy(), 10**400, "non_finite"),
    ("float32 max", spec(), ValuePolicy(), 3.4028234663852886e38, 3.4028234663852886e38),
    ("no bounds", spec(), ValuePolicy(), -1e30, -1e30),
    ("below min", spec(min=0), ValuePolicy(), -0.5, "out_of_range"),
    ("above max", spec(max=10), ValuePolicy(), 10.5, "out_of_range"),
    ("at min", spec(min=0, max=10), ValuePolicy(), 0, 0.0),
    ("at max", spec(min=0, max=10), ValuePolicy(), 10, 10.0),
    ("bool in range", spec(min=0, max=1), ValuePolicy(), True, 1.0),
    # an integer is compared exactly, not as the nearest double (2**53 + 1 -> 2.0**53)
    ("int at max beyond 2**53", spec(max=2.0**53), ValuePolicy(), 2**53, 2.0**53),
    ("int above max beyond 2**53", spec(max=2.0**53), ValuePolicy(), 2**53 + 1, "out_of_range"),
    (
        "int below min beyond 2**53",
        spec(min=-(2.0**53)),
        ValuePolicy(),
        -(2**53) - 1,
        "out_of_range",
    ),
    ("nan is not out of range", spec(min=0), ValuePolicy(), NAN, NAN),
    ("not numeric", spec(), ValuePolicy(), "12", "not_numeric"),
    ("not numeric, policy pass", spec(), ValuePolicy(infinite=PASS), [1], "not_numeric"),
    # manifest-wide policy
    ("missing dead", spec(), ValuePolicy(missing=DEAD), None, "missing_value"),
    ("nan dead", spec(), ValuePolicy(nan=DEAD), NAN, "nan_value"),
    ("inf pass is NaN", spec(), ValuePolicy(infinite=PASS), INF, NAN),
    ("beyond float32 pass is NaN", spec(), ValuePolicy(infinite=PASS), -1e39, NAN),
    ("range pass is the value", spec(max=10), ValuePolicy(out_of_range=PASS), 99, 99.0),
    # a feature's override wins over the manifest's
    ("override missing", spec(policy={"missing": DEAD}), ValuePolicy(), None, "missing_value"),
    ("override nan", spec(policy={"nan": DEAD}), ValuePolicy(), NAN, "nan_value"),
    ("override inf", spec(policy={"infinite": PASS}), ValuePolicy(), INF, NAN),
    ("override range", spec(min=1, policy={"out_of_range": PASS}), ValuePolicy(), 0, 0.0),
    ("override back to pass", spec(policy={"missing": PASS}), ValuePolicy(missing=DEAD), None, NAN),
    (
        "other key untouched",
        spec(policy={"nan": PASS}),
        ValuePolicy(missing=DEAD),
        None,
        "missing_value",
    ),
    # missing applies to every transform; unseen categories by the unseen policy (default: NaN)
    ("category missing", spec("category"), ValuePolicy(missing=DEAD), None, "missing_value"),
    ("category unseen", spec("category"), ValuePolicy(missing=DEAD), "Z", NAN),
    ("category seen", spec("category"), ValuePolicy(missing=DEAD), "B", 1.0),
    ("category first", spec("category"), ValuePolicy(unseen=DEAD), "A", 0.0),
    ("category unseen dead", spec("category"), ValuePolicy(unseen=DEAD), "Z", "unseen_category"),
    ("category not a string", spec("category"), ValuePolicy(unseen=DEAD), 1, "unseen_category"),
    ("category unseen, missing", spec("category"), ValuePolicy(unseen=DEAD), None, NAN),
    (
        "override unseen",
        spec("category", policy={"unseen": DEAD}),
        ValuePolicy(),
        "a",
        "unseen_category",
    ),
    (
        "override unseen pass",
        spec("category", policy={"unseen": PASS}),
        ValuePolicy(unseen=DEAD),
        "Z",
        NAN,
    ),
    ("unseen is no number's", spec(), ValuePolicy(unseen=DEAD), 2, 2.0),
    ("hour missing", spec("hour_of_day"), ValuePolicy(missing=DEAD), None, "missing_value"),
    ("hour missing pass", spec("hour_of_day"), ValuePolicy(), None, NAN),
    ("weekday missing", spec("day_of_week"), ValuePolicy(missing=DEAD), None, "missing_value"),
    ("hour from ms", spec("hour_of_day"), ValuePolicy(), 3_600_000 * 5, 5.0),
    ("hour, time past year 9999", spec("hour_of_day"), ValuePolicy(), 2**62, "not_timestamp"),
    ("weekday of a string", spec("day_of_week"), ValuePolicy(), "monday", "not_timestamp"),
    (
        "hour, datetime that cannot be UTC",
        spec("hour_of_day"),
        ValuePolicy(),
        datetime.min.replace(tzinfo=timezone(timedelta(hours=5))),
        "not_timestamp",
    ),
]


@pytest.mark.parametrize(
    ("feature", "policy", "value", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_value_policy(
    feature: FeatureSpec, policy: ValuePolicy, value: Any, expected: float | str
) -> None:
    (resolved,) = manifest(feature, value_policy=policy).features
    ok = "A" if feature.transform == "category" else 1  # a value every policy passes
    matrix, rejected = FeatureBuilder([resolved]).build([{"v": ok}, {"v": value}, {"v": ok}])
    assert matrix.dtype == np.float32
    if isinstance(expected, str):
        assert [(r.index, r.feature, r.reason) for r in rejected] == [(1, "f", expected)]
        assert expected in FEATURE_REASONS
        assert math.isnan(float(matrix[1, 0]))
    else:
        assert rejected == []
        got = float(matrix[1, 0])
        assert (math.isnan(got) and math.isnan(expected)) or got == np.float32(expected)


def test_absent_field_is_missing() -> None:
    strict = manifest(FeatureSpec("f", "outer.v"), value_policy=ValuePolicy(missing=DEAD)).features
    _, rejected = FeatureBuilder(strict).build([{"outer": {"v": 1}}, {}, {"outer": None}])
    assert [(r.index, r.reason) for r in rejected] == [(1, "missing_value"), (2, "missing_value")]


def test_first_rejecting_feature_names_the_row() -> None:
    feats = manifest(
        FeatureSpec("a", "a", min=0), FeatureSpec("b", "b", policy={"nan": DEAD})
    ).features
    _, rejected = FeatureBuilder(feats).build([{"a": -1, "b": NAN}, {"a": 1, "b": NAN}])
    assert [(r.index, r.feature, r.reason) for r in rejected] == [
        (0, "a", "out_of_range"),
        (1, "b", "nan_value"),
    ]


ONE_OF_ACTIONS = "must be one of dead_letter, pass"
POLICY_KEYS = "unknown key (known: infinite, missing, nan, out_of_range, unseen)"
FEATURE_KEYS = "unknown key (known: categories, field, max, min, name, policy, transform)"
TRANSFORM_NAMES = "category, day_of_week, hour_of_day, number"
MANIFEST_KEYS = (
    "unknown key (known: created_at, features, format, metrics, model_file, model_sha256, "
    "model_version, objective, reference, threshold, value_policy, xgboost_version)"
)
OBJECTIVE_NAMES = (
    "binary:logistic, reg:absoluteerror, reg:pseudohubererror, reg:squarederror, "
    "reg:squaredlogerror"
)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"policy": {"nan": "drop"}}, f"policy.nan: {ONE_OF_ACTIONS}, got 'drop'"),
        ({"policy": {"weird": PASS}}, f"policy.weird: {POLICY_KEYS}"),
        ({"min": 5, "max": 1}, "min: must not be above max (1.0), got 5.0"),
        ({"min": INF}, "min: must be a finite number, got inf"),
        ({"max": NAN}, "max: must be a finite number, got nan"),
        ({"min": True}, "min: must be a number, got True"),
        (
            {"transform": "category", "categories": ("A",), "min": 0},
            "min: applies to 'number' features only",
        ),
        ({"policy": {"unseen": DEAD}}, "policy.unseen: applies to 'category' features only"),
        (
            {"transform": "hour_of_day", "policy": {"unseen": PASS}},
            "policy.unseen: applies to 'category' features only",
        ),
        (
            {"transform": "category", "categories": ("A",), "policy": {"unseen": "nan"}},
            f"policy.unseen: {ONE_OF_ACTIONS}, got 'nan'",
        ),
        ({"transform": "category"}, "categories: required for a 'category' feature"),
        (
            {"transform": "log"},
            f"transform: must be one of {TRANSFORM_NAMES}, got 'log'",
        ),
    ],
)
def test_bad_feature_policies_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError) as caught:
        FeatureSpec("f", "v", **kwargs)
    assert str(caught.value) == f"feature 'f': {message}"


def test_positional_arguments_are_named_in_errors() -> None:
    with pytest.raises(ModelError, match=r"^feature 'f': transform: must be one of"):
        FeatureSpec("f", "v", "log")
    with pytest.raises(ModelError, match=r"^value policy: nan: must be one of"):
        ValuePolicy(PASS, "skip")


def test_bad_manifest_policy_is_refused() -> None:
    with pytest.raises(ModelError) as caught:
        ValuePolicy(nan="ignore")
    assert str(caught.value) == f"value policy: nan: {ONE_OF_ACTIONS}, got 'ignore'"


def test_a_feature_spec_is_equal_to_its_copy_and_the_default_policy_is_no_argument() -> None:
    spec = FeatureSpec("d", "d", min=0, max=500, policy={"nan": DEAD})
    strict = ValuePolicy(missing=DEAD)
    (resolved,) = manifest(spec, value_policy=strict).features
    assert resolved == spec and hash(resolved) == hash(spec)  # default_policy: not compared
    assert resolved.effective_policy == ValuePolicy(missing=DEAD, nan=DEAD)
    assert spec.effective_policy == ValuePolicy(nan=DEAD)  # the caller's spec is unchanged
    assert (spec.min, spec.max, spec.policy) == (0.0, 500.0, {"nan": DEAD})
    with pytest.raises(ModelError, match=r"^feature 'd': default_policy: unknown key"):
        FeatureSpec("d", "d", default_policy=strict)  # type: ignore[call-arg]


BASE: dict[str, Any] = {
    "format": 1,
    "model_version": "v1",
    "model_file": "model.ubj",
    "model_sha256": "0" * 64,
    "objective": "reg:squarederror",
    "xgboost_version": "3.2.0",
    "features": [
        {"name": "a", "field": "a"},
        {"name": "c", "field": "c", "transform": "hour_of_day"},
    ],
}


def test_old_manifests_load_with_the_default_policy() -> None:
    loaded = manifest_from_dict(BASE)
    assert loaded.value_policy == ValuePolicy("pass", "pass", "dead_letter", "dead_letter", "pass")
    assert [f.effective_policy for f in loaded.features] == [ValuePolicy(), ValuePolicy()]
    assert [(f.min, f.max, dict(f.policy)) for f in loaded.features] == [(None, None, {})] * 2


#: A JSON change to BASE and the error it gives: every check names the key's path.
BAD_MANIFESTS: list[tuple[dict[str, Any], str]] = [
    ({"value_policy": {"nan": "skip"}}, f"value_policy.nan: {ONE_OF_ACTIONS}, got 'skip'"),
    ({"value_policy": {"nans": PASS}}, f"value_policy.nans: {POLICY_KEYS}"),
    ({"value_policy": ["pass"]}, "value_policy: must be a JSON object, got list"),
    ({"value_policy": {"unseen": "skip"}}, f"value_policy.unseen: {ONE_OF_ACTIONS}, got 'skip'"),
    (
        {"features": [{"name": "a", "field": "a", "min": "0"}]},
        "features[0].min: must be a number, got '0'",
    ),
    (
        {"features": [{"name": "a", "field": "a", "max": True}]},
        "features[0].max: must be a number, got True",
    ),
    (
        {"features": [{"name": "a", "field": "a", "min": 2, "max": 1}]},
        "features[0].min: must not be above max (1.0), got 2.0",
    ),
    (
        {"features": [{"name": "a", "field": "a", "policy": {"nan": "skip"}}]},
        f"features[0].policy.nan: {ONE_OF_ACTIONS}, got 'skip'",
    ),
    (
        {"features": [{"name": "a", "field": "a", "policy": {"nanx": PASS}}]},
        f"features[0].policy.nanx: {POLICY_KEYS}",
    ),
    (
        {"features": [{"name": "a", "field": "a", "policy": "dead_letter"}]},
        "features[0].policy: must be a JSON object, got str",
    ),
    (
        {"features": [{"name": "a", "field": "a", "policy": {"unseen": PASS}}]},
        "features[0].policy.unseen: applies to 'category' features only",
    ),
    (
        {
            "features": [
                {"name": "a", "field": "a"},
                {"name": "c", "field": "c", "transform": "category", "categories": ["x"], "min": 0},
            ]
        },
        "features[1].min: applies to 'number' features only",
    ),
    (
        {"features": [{"name": "a", "field": "a", "transform": "category"}]},
        "features[0].categories: required for a 'category' feature",
    ),
    (
        {
            "features": [
                {"name": "a", "field": "a", "transform": "category", "categories": ["x", 1]}
            ]
        },
        "features[0].categories[1]: must be a string, got 1",
    ),
    (
        {"features": [{"name": "a", "field": "a", "transform": "log"}]},
        f"features[0].transform: must be one of {TRANSFORM_NAMES}, got 'log'",
    ),
    ({"features": [{"name": "a"}]}, "features[0].field: is required"),
    (
        {"features": [{"name": "a", "field": "a", "scale": 2}]},
        f"features[0].scale: {FEATURE_KEYS}",
    ),
    (
        {"features": [{"name": "a", "field": "a", "default_policy": {}}]},
        f"features[0].default_policy: {FEATURE_KEYS}",
    ),
    (
        {"features": [{"name": "a", "field": "a"}, {"name": "a", "field": "b"}]},
        "features[1].name: 'a' is listed twice",
    ),
    ({"features": []}, "features: must list at least one feature"),
    ({"features": {"name": "a"}}, "features: must be a JSON array, got dict"),
    (
        {"objective": "reg:tweedie"},
        f"objective: must be one of {OBJECTIVE_NAMES}, got 'reg:tweedie'",
    ),
    ({"threshold": 1.0}, "threshold: must be below 1.0, got 1.0"),
    ({"threshold": 0}, "threshold: must be greater than 0.0, got 0"),
    ({"threshold": "0.5"}, "threshold: must be a number, got '0.5'"),
    ({"model_version": 7}, "model_version: must be a string, got 7"),
    ({"metrics": [1]}, "metrics: must be a JSON object, got list"),
    ({"format": 2}, "format: must be 1, got 2"),
    ({"format": 2, "objective": "x", "surprise": 1}, "format: must be 1, got 2"),  # named first
    ({"format": "1"}, "format: must be an integer, got '1'"),
    ({"format": None}, "format: must be an integer, got None"),
    (
        {"surprise": 1},
        f"surprise: {MANIFEST_KEYS}",
    ),
]


@pytest.mark.parametrize(("change", "message"), BAD_MANIFESTS, ids=[m for _, m in BAD_MANIFESTS])
def test_bad_manifests_are_refused_naming_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError) as caught:
        manifest_from_dict({**BASE, **change})
    assert str(caught.value) == f"manifest: {message}"


@pytest.mark.parametrize(
    "key",
    [
        "format",
        "model_version",
        "model_file",
        "model_sha256",
        "objective",
        "features",
        "xgboost_version",
    ],
)
def test_a_manifest_without_a_required_key_is_refused(key: str) -> None:
    raw = {k: v for k, v in BASE.items() if k != key}
    with pytest.raises(ModelError) as caught:
        manifest_from_dict(raw)
    assert str(caught.value) == f"manifest: {key}: is required"


def test_a_manifest_file_error_names_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({**BASE, "value_policy": {"nan": "skip"}}))
    with pytest.raises(ModelError) as caught:
        read_manifest(tmp_path)
    assert str(caught.value) == f"manifest {path}: value_policy.nan: {ONE_OF_ACTIONS}, got 'skip'"
    path.write_text("[1]")
    with pytest.raises(ModelError) as caught:
        read_manifest(tmp_path)
    assert str(caught.value) == f"manifest {path}: must be a JSON object, got list"


def test_the_example_manifest_fits_the_json_schema_that_refuses_bad_ones(tmp_path: Path) -> None:
    from stream_scorer.example.train import train

    train(tmp_path, rows=400, n_estimators=2, max_depth=2)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    schema = manifest_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert list(validator.iter_errors(raw)) == []
    assert list(validator.iter_errors(BASE)) == []
    feature = raw["features"][0]
    for bad in [
        {**raw, "surprise": 1},
        {**raw, "format": 2},
        {k: v for k, v in raw.items() if k != "format"},
        {**raw, "threshold": 1.5},
        {**raw, "objective": "reg:tweedie"},
        {**raw, "value_policy": {"nan": "skip"}},
        {**raw, "features": [{**feature, "scale": 2}]},
        {**raw, "features": [{**feature, "transform": "log"}]},
        {**raw, "features": [{**feature, "policy": {"nanx": "pass"}}]},
        {**raw, "features": [{**feature, "min": "0"}]},
    ]:
        assert list(validator.iter_errors(bad)) != [], bad
        with pytest.raises(ModelError):
            manifest_from_dict(bad)  # what the schema refuses, loading refuses too


def test_the_manual_documents_every_manifest_key() -> None:
    page = (Path(__file__).parents[2] / "docs" / "manual" / "models.md").read_text()
    section = page.split("\n## The model manifest\n")[1].split("\n## ")[0]
    schema = manifest_json_schema()
    objects = [schema, *schema["$defs"].values()]
    keys = {key for obj in objects for key in obj["properties"]}
    assert {"format", "model_version", "min", "policy", "unseen"} <= keys
    assert sorted(k for k in keys if f"`{k}`" not in section) == []


def test_policies_round_trip_through_manifest_json(tmp_path: Path) -> None:
    written = Manifest(
        "v1",
        "model.ubj",
        "0" * 64,
        "reg:squarederror",
        (
            FeatureSpec("d", "d", min=0, max=500, policy={"nan": DEAD}),
            FeatureSpec("z", "z", policy={"out_of_range": PASS}),
            FeatureSpec("h", "t", "hour_of_day"),
            FeatureSpec("c", "c", "category", ("x", "y"), policy={"unseen": DEAD}),
        ),
        "3.2.0",
        value_policy=ValuePolicy(missing=DEAD),
    )
    write_manifest(tmp_path, written)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["value_policy"] == {
        "missing": "dead_letter",
        "nan": "pass",
        "infinite": "dead_letter",
        "out_of_range": "dead_letter",
        "unseen": "pass",
    }
    assert raw["features"][0] == {
        "name": "d",
        "field": "d",
        "transform": "number",
        "min": 0.0,
        "max": 500.0,
        "policy": {"nan": "dead_letter"},
    }
    assert raw["features"][2] == {"name": "h", "field": "t", "transform": "hour_of_day"}
    assert raw["features"][3]["policy"] == {"unseen": "dead_letter"}
    loaded = read_manifest(tmp_path)
    assert loaded == written
    assert [f.effective_policy for f in loaded.features] == [
        ValuePolicy(missing=DEAD, nan=DEAD),
        ValuePolicy(missing=DEAD, out_of_range=PASS),
        ValuePolicy(missing=DEAD),
        ValuePolicy(missing=DEAD, unseen=DEAD),
    ]


def test_category_values_are_their_position_and_unseen_ones_are_counted() -> None:
    feats = manifest(
        FeatureSpec("c", "c", "category", ("A", "B", "C")),
        FeatureSpec("d", "d", "category", ("x",), policy={"unseen": DEAD}),
        FeatureSpec("n", "n"),
    ).features
    records: list[dict[str, Any]] = [
        {"c": "C", "d": "x", "n": 1},
        {"c": "Z", "d": "x", "n": 1},
        {"c": None, "d": None, "n": 1},  # missing is not unseen
        {"c": 3, "d": "y", "n": 1},  # not a string: unseen; "y" dead-letters the row
        {"c": "a", "d": ["x"], "n": "A"},  # counted also where another feature rejects the row
    ]
    builder = FeatureBuilder(feats)
    matrix, rejected = builder.build(records)
    assert matrix[0, 0] == 2.0 and matrix[0, 1] == 0.0
    assert [math.isnan(v) for v in matrix[1:4, 0].tolist()] == [True, True, True]
    assert [(r.index, r.feature, r.reason, r.message) for r in rejected] == [
        (3, "d", "unseen_category", "d: value 'y' is not one of the categories"),
        (
            4,
            "d",
            "unseen_category",
            "d: value is not a string or enum symbol (so none of the categories)",
        ),
    ]
    assert builder.unseen(records) == {"c": 3, "d": 2}
    assert builder.unseen(records[:1]) == {}
    assert FeatureBuilder(feats[2:]).unseen(records) == {}
