"""LayerPlan: JSON round trip, validation that names the field, and the ratio / first-last rules."""
import json
import random

import pytest

from salaconvert.errors import InputError
from salaconvert.layer_selection import LayerPlan, PlanError, num_sparse
from salaconvert.layer_selection.plan import LINEAR, SPARSE, score_ranks, select_layer_types


def _plan(**kw):
    types = [SPARSE, LINEAR, LINEAR, LINEAR, SPARSE, LINEAR, LINEAR, SPARSE]
    base = dict(layer_types=types, scores=[0.5, 0.1, 0.2, 0.3, 0.9, 0.0, 0.4, 0.7], method="kl", seed=3, ratio="1:3",
                model_fingerprint="abc123", data_fingerprint="def456", extra={"details": {"x": [1.5, 2.0]}})
    return LayerPlan(**{**base, **kw})


def test_round_trip_is_exact(tmp_path):
    plan = _plan().validate(8)
    plan.save(tmp_path / "plan.json")
    loaded = LayerPlan.load(tmp_path / "plan.json")
    assert loaded == plan
    assert loaded.to_dict() == json.loads((tmp_path / "plan.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left behind


@pytest.mark.parametrize("data, field", [
    ({"layer_types": ["sparse_attention", "softmax"]}, "layer_types: unknown type(s) ['softmax']"),
    ({"layer_types": []}, "layer_types: must be a non-empty list"),
    ({"layer_types": "sparse_attention"}, "layer_types: must be a non-empty list"),
    ({"layer_types": ["linear_attention"] * 3}, "layer_types: every layer is linear"),
    ({"layer_types": ["sparse_attention", 7]}, "layer_types: unknown type(s) ['7']"),
    ({"layer_types": ["sparse_attention"] * 2, "scores": [1.0]}, "scores: 1 entries for 2 layers"),
    ({"layer_types": ["sparse_attention"] * 2, "scores": [1.0, float("nan")]}, "scores: every score must be a finite"),
    ({"layer_types": ["sparse_attention"] * 2, "ratio": "1-3"}, "ratio '1-3'"),
    ({"layer_types": ["sparse_attention"] * 2, "seed": "zero"}, "seed: expected an integer"),
    ({"layer_types": ["sparse_attention"] * 2, "method": 3}, "method: expected a string"),
    ({"layer_types": ["sparse_attention"] * 2, "extra": []}, "extra: expected an object"),
    ({"layer_types": ["sparse_attention"] * 2, "colour": "red"}, "plan: unknown field(s) ['colour']"),
    ({"scores": [1.0]}, "layer_types: missing"),
    ([1, 2], "plan: expected a JSON object"),
])
def test_validation_names_the_field(data, field):
    with pytest.raises(PlanError) as e:
        LayerPlan.from_dict(data)
    assert field in str(e.value)
    assert isinstance(e.value, InputError)  # the CLI turns it into one line and exit code 2


def test_layer_count_mismatch_and_bad_files(tmp_path):
    with pytest.raises(PlanError, match="layer_types: 8 entries, but the model has 30 layers"):
        _plan().validate(30)
    with pytest.raises(PlanError, match="no such file"):
        LayerPlan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        LayerPlan.load(tmp_path / "bad.json")


@pytest.mark.parametrize("num_layers", [2, 4, 7, 30, 32])
@pytest.mark.parametrize("ratio", ["1:3", "1:1", "1:7", "2:5"])
@pytest.mark.parametrize("first_last", [True, False])
def test_selection_keeps_the_ratio_first_last_and_top_scores(num_layers, ratio, first_last):
    scores = [random.Random(f"{num_layers}{ratio}{i}").random() for i in range(num_layers)]
    types = select_layer_types(scores, ratio, first_last)
    n = num_sparse(num_layers, ratio, first_last)
    kept = {i for i, t in enumerate(types) if t == SPARSE}
    assert len(types) == num_layers and len(kept) == n
    forced = {0, num_layers - 1} if first_last else set()
    assert forced <= kept
    rest = sorted(set(range(num_layers)) - forced, key=lambda i: -scores[i])
    assert kept - forced == set(rest[: n - len(forced)])


def test_ranks_and_ties_are_deterministic():
    assert score_ranks([0.5, 0.9, 0.5, 0.1]) == [2, 1, 3, 4]
    # Equal scores: the lower index wins the sparse slot.
    assert select_layer_types([0.0] * 8, "1:3", first_last=False) == [SPARSE, SPARSE] + [LINEAR] * 6
