"""AutoPrecision: validation when built, and the ordinary Recipe an assignment becomes (saved and loaded)."""

import json

import pytest

from qcompiler.config import GPTQ, HQQ, ActivationScheme, WeightScheme, recipe_from_json, recipe_to_json
from qcompiler.config.auto import CANDIDATES, AutoPrecision, Candidate, recipe_for, uniform_recipe
from qcompiler.core.errors import ConfigError, ConfigTypeError

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj",
           "model.layers.11.mlp.up_proj", "lm_head"]


def test_an_assignment_becomes_a_recipe_giving_each_layer_its_candidate_and_round_trips_through_json():
    auto = AutoPrecision(5.0)
    assignment = dict(zip(MODULES, ["w4-g128", "w8a8-dynamic", "float", "w4-g128", "w8-channel"]))
    recipe = recipe_for(auto, assignment)
    for module, name in assignment.items():
        assert recipe.scheme_for(module) == CANDIDATES[name].scheme, module
    assert recipe.scheme_for("model.embed_tokens") is None  # auto.skip stays
    assert recipe.weight == CANDIDATES["w4-g128"].weight and recipe.activation is None  # the most common one
    assert len(recipe.overrides) == 2 and recipe.name == "auto-5bpw"
    loaded = recipe_from_json(json.loads(json.dumps(recipe_to_json(recipe))))
    assert loaded == recipe
    assert all(loaded.scheme_for(m) == recipe.scheme_for(m) for m in MODULES)


def test_an_all_float_assignment_skips_every_layer_and_hqq_reaches_the_recipe():
    recipe = recipe_for(AutoPrecision(32.0), dict.fromkeys(MODULES, "float"))
    assert all(recipe.scheme_for(m) is None for m in MODULES)
    hqq = AutoPrecision(4.5, candidates=("float", "w4-g128", "w3-g64"), rounding=HQQ())
    recipe = recipe_for(hqq, dict(zip(MODULES, ["w3-g64", "w4-g128", "w4-g128", "float", "w3-g64"])))
    assert isinstance(recipe.rounding, HQQ) and recipe.scheme_for("lm_head").weight.bits == 3
    assert uniform_recipe(hqq, CANDIDATES["w3-g64"]).rounding == HQQ()
    assert uniform_recipe(hqq, CANDIDATES["float"]).scheme_for("model.layers.0.mlp.up_proj") is None


def test_candidates_are_names_or_candidates_and_resolve_when_built():
    own = Candidate("w6-channel", WeightScheme(bits=6, granularity="per_channel"))
    auto = AutoPrecision(6.0, candidates=("float", own))
    assert auto.candidates == (CANDIDATES["float"], own)
    assert recipe_for(auto, {"lm_head": "w6-channel"}).scheme_for("lm_head").weight.bits == 6
    with pytest.raises(ConfigError, match="not one of this search's candidates"):
        recipe_for(auto, {"lm_head": "w4-g128"})


@pytest.mark.parametrize("kwargs, match", [
    ({"target_bpw": 0}, "positive number of bits per weight"),
    ({"target_bpw": float("inf")}, "positive number of bits per weight"),
    ({"target_bpw": 5.0, "candidates": ()}, "non-empty tuple"),
    ({"target_bpw": 5.0, "candidates": "w4-g128"}, "non-empty tuple"),
    ({"target_bpw": 5.0, "candidates": ("w5-g7",)}, "unknown candidate 'w5-g7'; the named candidates are: float"),
    ({"target_bpw": 5.0, "candidates": ("float", "float")}, r"\['float'\] more than once"),
    ({"target_bpw": 5.0, "metric": "ppl"}, "metric must be one of kl, mse"),
    ({"target_bpw": 5.0, "rounding": HQQ(), "candidates": ("float", "w8-channel")},
     r"HQQ rounding fits zero points, and no candidate has asymmetric weights"),
    ({"target_bpw": 5.0, "samples": 0}, "samples must be an integer of at least 1"),
])
def test_bad_searches_are_errors_that_say_what_to_give(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AutoPrecision(**kwargs)


def test_wrong_types_and_static_candidates_are_refused():
    with pytest.raises(ConfigTypeError, match=r"rounding must be None \(round to nearest\), HQQ\(\), GPTQ\(\) or AWQ\(\)"):
        AutoPrecision(5.0, rounding="gptq")
    assert AutoPrecision(5.0, rounding=GPTQ()).rounding == GPTQ()  # data-driven: calibrated per candidate
    with pytest.raises(ConfigTypeError, match="skip must be a tuple"):
        AutoPrecision(5.0, skip="lm_head")
    static = ActivationScheme(granularity="per_tensor", dynamic=False)
    with pytest.raises(ConfigError, match="static activations need calibration statistics"):
        Candidate("w8a8-static", WeightScheme(), static)
    with pytest.raises(ConfigError, match="a float layer"):
        Candidate("odd", None, ActivationScheme())
    with pytest.raises(ConfigError, match="pattern characters"):
        recipe_for(AutoPrecision(5.0), {"layers[0]": "w4-g128"})
