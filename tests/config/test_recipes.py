"""Recipes: per-layer schemes from overrides and the skip list, and validation when a recipe is built."""

import pytest
import torch

import qcompiler
from qcompiler.config import (
    AWQ,
    GPTQ,
    HQQ,
    ActivationScheme,
    LayerOverride,
    MixedInt8,
    OutlierSplit,
    Recipe,
    SmoothQuant,
    WeightScheme,
)

W8 = WeightScheme(bits=8, granularity="per_channel", symmetric=True)
W4G32 = WeightScheme(bits=4, granularity="per_group", group_size=32, symmetric=False)
DYNAMIC = ActivationScheme()
STATIC_MSE = ActivationScheme(granularity="per_tensor", dynamic=False, observer="mse")

OVERLAPPING = (
    LayerOverride("*.mlp.*", weight=W4G32),
    LayerOverride("*.down_proj", weight_only=True),
    LayerOverride("*.layers.1.*", activation=STATIC_MSE),
)


@pytest.mark.parametrize("module, weight, activation", [
    ("model.layers.2.self_attn.o_proj", W8, DYNAMIC),          # no override matches
    ("model.layers.1.self_attn.q_proj", W8, STATIC_MSE),      # only the activation override
    ("model.layers.2.mlp.gate_proj", W4G32, DYNAMIC),         # only the weight override
    ("model.layers.2.mlp.down_proj", W4G32, None),            # weight override, then weight_only
    ("model.layers.1.mlp.gate_proj", W4G32, STATIC_MSE),      # each override changes only what it gives
    ("model.layers.1.mlp.down_proj", W4G32, STATIC_MSE),      # a later activation undoes weight_only
])
def test_overlapping_overrides_apply_in_order_and_inherit_what_they_leave_out(module, weight, activation):
    recipe = Recipe(weight=W8, activation=DYNAMIC, overrides=OVERLAPPING)
    scheme = recipe.scheme_for(module)
    assert (scheme.weight, scheme.activation) == (weight, activation)


def test_the_last_matching_override_wins_and_the_skip_list_beats_every_override():
    reordered = Recipe(weight=W8, activation=DYNAMIC, overrides=(OVERLAPPING[0], OVERLAPPING[2], OVERLAPPING[1]),
                       skip=("lm_head", "*.layers.0.mlp.*"))
    assert reordered.scheme_for("model.layers.1.mlp.down_proj").activation is None
    assert reordered.scheme_for("model.layers.1.mlp.up_proj").activation == STATIC_MSE
    for skipped in ("lm_head", "model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"):
        assert reordered.scheme_for(skipped) is None, skipped
    assert reordered.skip_pattern_for("model.layers.0.mlp.down_proj") == "*.layers.0.mlp.*"
    assert reordered.scheme_for("model.layers.0.self_attn.v_proj").weight == W8
    # an override's static activation makes the whole recipe need calibration
    assert Recipe(overrides=OVERLAPPING).needs_calibration and not Recipe(overrides=OVERLAPPING[:2]).needs_calibration


class _Block(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.self_attn, self.mlp = torch.nn.Module(), torch.nn.Module()
        self.self_attn.q_proj, self.self_attn.o_proj = torch.nn.Linear(width, width), torch.nn.Linear(width, width)
        self.mlp.up_proj, self.mlp.down_proj = torch.nn.Linear(width, 2 * width), torch.nn.Linear(2 * width, width)

    def forward(self, x):
        x = x + self.self_attn.o_proj(torch.relu(self.self_attn.q_proj(x)))
        return x + self.mlp.down_proj(torch.relu(self.mlp.up_proj(x)))


class _LlamaNamed(torch.nn.Module):
    """Linears named as in a Llama (model.layers.N.self_attn/mlp.*, lm_head), without the rest of it."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList([_Block(width), _Block(width)])
        self.lm_head = torch.nn.Linear(width, 16)

    def forward(self, x):
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(x)


def test_a_compiled_model_with_overrides_reports_each_layers_scheme():
    recipe = Recipe(
        name="mixed", weight=W8, activation=DYNAMIC, skip=("lm_head", "*.layers.1.self_attn.q_proj"),
        overrides=(LayerOverride("*.mlp.down_proj", weight=W4G32, weight_only=True),
                   LayerOverride("*.self_attn.o_proj", activation=ActivationScheme(granularity="per_tensor"))),
    )
    model = _LlamaNamed().eval()
    x = torch.randn(1, 12, 32)
    with torch.inference_mode():
        out = torch.compile(model, backend="qcompiler", options={"recipe": recipe})(x)
        ref = model(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99
    rep = qcompiler.last_report()
    schemes = {d.module: d.scheme for d in rep.quantized}
    assert len(schemes) == 7
    for layer in (0, 1):
        prefix = f"model.layers.{layer}."
        assert schemes[prefix + "mlp.down_proj"] == "W: int4 g32 asym; A: float activations"
        assert schemes[prefix + "self_attn.o_proj"] == "W: int8 per_channel sym; A: int8 dynamic per_tensor sym"
        assert schemes[prefix + "mlp.up_proj"] == "W: int8 per_channel sym; A: int8 dynamic per_token sym"
    assert schemes["model.layers.0.self_attn.q_proj"] == "W: int8 per_channel sym; A: int8 dynamic per_token sym"
    kept = {d.module: d.reason for d in rep.kept_float}
    assert kept == {"lm_head": "skipped by the recipe's skip pattern 'lm_head'",
                    "model.layers.1.self_attn.q_proj": "skipped by the recipe's skip pattern "
                                                       "'*.layers.1.self_attn.q_proj'"}
    assert "int4 g32 asym" in str(rep) and "dynamic per_tensor" in str(rep)


@pytest.mark.parametrize("build, error, message", [
    # weights
    (lambda: WeightScheme(bits=9), ValueError, r"WeightScheme.bits must be an integer from 2 to 8, got 9"),
    (lambda: WeightScheme(bits=1), ValueError, r"WeightScheme.bits must be an integer from 2 to 8, got 1"),
    (lambda: WeightScheme(bits=4.0), ValueError, r"WeightScheme.bits must be an integer from 2 to 8, got 4.0"),
    (lambda: WeightScheme(granularity="per_token"), ValueError,
     r"WeightScheme.granularity must be one of per_channel, per_group, per_tensor; got 'per_token'"),
    (lambda: WeightScheme(observer="ema"), ValueError, r"WeightScheme.observer must be one of minmax, .*got 'ema'"),
    (lambda: WeightScheme(percentile=50), ValueError, r"WeightScheme.percentile must be in \(50, 100\]"),
    (lambda: WeightScheme(percentile=100.5), ValueError, r"WeightScheme.percentile must be in \(50, 100\]"),
    (lambda: WeightScheme(granularity="per_group"), ValueError, r"'per_group' needs a positive group_size, got None"),
    (lambda: WeightScheme(granularity="per_group", group_size=0), ValueError, r"positive group_size, got 0"),
    (lambda: WeightScheme(group_size=128), ValueError,
     r"group_size=128 only applies to granularity 'per_group', not 'per_channel'"),
    (lambda: WeightScheme(fit_group=True), ValueError, r"fit_group=True only applies to granularity 'per_group'"),
    (lambda: WeightScheme(fp16_scales=1), ValueError, r"WeightScheme.fp16_scales must be True or False, got 1"),
    (lambda: WeightScheme(bits=4, symmetric=False, full_range=True), ValueError,
     r"full_range applies to symmetric weights of 2 to 4 bits .*symmetric=False"),
    (lambda: WeightScheme(bits=8, full_range=True), ValueError, r"full_range applies to .* got bits=8"),
    # activations
    (lambda: ActivationScheme(bits=9), ValueError, r"ActivationScheme.bits must be an integer from 2 to 8, got 9"),
    (lambda: ActivationScheme(bits=1), ValueError, r"ActivationScheme.bits must be an integer from 2 to 8, got 1"),
    (lambda: ActivationScheme(granularity="per_channel"), ValueError,
     r"ActivationScheme.granularity must be one of per_token, per_tensor; got 'per_channel'"),
    (lambda: ActivationScheme(observer="histogram"), ValueError,
     r"ActivationScheme.observer must be one of minmax, ema, percentile, mse, kl; got 'histogram'"),
    (lambda: ActivationScheme(dynamic=False), ValueError,  # static with the default per_token granularity
     r"static activations are quantized per tensor .*use granularity='per_tensor' or dynamic=True"),
    (lambda: ActivationScheme(observer="mse"), ValueError,
     r"observer 'mse' selects a static range; dynamic activations .* Use dynamic=False"),
    (lambda: ActivationScheme(granularity="per_tensor", dynamic=False, observer="percentile", percentile=100.01),
     ValueError, r"ActivationScheme.percentile must be in \(50, 100\], e.g. 99.99; got 100.01"),
    (lambda: ActivationScheme(granularity="per_tensor", dynamic=False, observer="percentile", percentile=10),
     ValueError, r"ActivationScheme.percentile must be in \(50, 100\]"),
    # overrides
    (lambda: LayerOverride(""), ValueError, r"LayerOverride.pattern must be a non-empty module-name pattern"),
    (lambda: LayerOverride("*.mlp.*", activation=DYNAMIC, weight_only=True), ValueError,
     r"give either an activation scheme or weight_only=True, not both"),
    (lambda: LayerOverride("*.mlp.*", weight="int4"), TypeError, r"LayerOverride.weight must be a WeightScheme"),
    (lambda: LayerOverride("*.mlp.*", activation="dynamic"), TypeError,
     r"LayerOverride.activation must be an ActivationScheme"),
    # recipes
    (lambda: Recipe(weight="int8"), TypeError, r"Recipe.weight must be a WeightScheme, got str"),
    (lambda: Recipe(weight="int4", rounding=HQQ()), TypeError, r"Recipe.weight must be a WeightScheme, got str"),
    (lambda: Recipe(activation=W8), TypeError, r"Recipe.activation must be an ActivationScheme or None"),
    (lambda: Recipe(skip="lm_head"), TypeError, r"Recipe.skip must be a tuple of module-name patterns"),
    (lambda: Recipe(overrides=LayerOverride("x")), TypeError, r"Recipe.overrides must be a tuple of LayerOverride"),
    (lambda: Recipe(overrides=("*.mlp.*",)), TypeError, r"Recipe.overrides must be a tuple of LayerOverride"),
    (lambda: Recipe(smoothquant=0.5), TypeError, r"Recipe.smoothquant must be a SmoothQuant or None, got float"),
    (lambda: Recipe(rounding="gptq"), TypeError, r"Recipe.rounding must be GPTQ\(\), AWQ\(\), HQQ\(\) or None"),
    (lambda: Recipe(rounding=AWQ(), smoothquant=SmoothQuant()), ValueError,
     r"SmoothQuant combines with GPTQ rounding only"),
    (lambda: Recipe(rounding=HQQ()), ValueError, r"HQQ optimizes the zero point, so it needs asymmetric weights"),
    # the methods' own parameters
    (lambda: SmoothQuant(alpha=1.5), ValueError, r"SmoothQuant.alpha must be in \[0, 1\] or 'auto'"),
    (lambda: SmoothQuant(groups=("mlp",)), ValueError, r"SmoothQuant.groups must be a non-empty subset"),
    (lambda: OutlierSplit(expand_ratio=0), ValueError, r"OutlierSplit.expand_ratio must be in \(0, 1\]"),
    (lambda: OutlierSplit(mode="both"), ValueError, r"OutlierSplit.mode must be one of activation, weight"),
    (lambda: MixedInt8(threshold=0), ValueError, r"MixedInt8.threshold must be positive"),
    (lambda: GPTQ(damp=0), ValueError, r"GPTQ.damp must be in \(0, 1\)"),
    (lambda: GPTQ(block_size=0), ValueError, r"GPTQ.block_size must be a positive int"),
    (lambda: AWQ(min_clip=0), ValueError, r"AWQ.min_clip must be in \(0, 1\]"),
    (lambda: HQQ(lp_norm=1.5), ValueError, r"HQQ.lp_norm must be in \(0, 1\]"),
])
def test_invalid_recipes_are_rejected_when_built_with_a_message_that_says_why(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_valid_edge_values_are_accepted():
    assert WeightScheme(bits=2).qrange == (-1, 1) and WeightScheme(bits=8, symmetric=False).qrange == (0, 255)
    assert WeightScheme(bits=4, full_range=True).qrange == (-8, 7)  # llama.cpp's Q4_0 levels
    assert "sym-full fp16-scales" in WeightScheme(bits=4, full_range=True, fp16_scales=True).describe()
    top = ActivationScheme(granularity="per_tensor", dynamic=False, observer="percentile", percentile=100)
    assert top.percentile == 100
    assert ActivationScheme(dynamic=False, granularity="per_tensor").symmetric is False  # static: asymmetric
    assert ActivationScheme().symmetric is True  # dynamic: symmetric
    recipe = Recipe(skip=["lm_head"], overrides=[LayerOverride("*.mlp.*", weight=W4G32)])
    assert recipe.skip == ("lm_head",) and isinstance(recipe.overrides, tuple)  # lists become tuples (frozen)
    with pytest.raises(AttributeError):
        recipe.skip = ()
