"""Named recipes: ``torch.compile(..., options={"recipe": name_or_recipe})`` takes either."""

from __future__ import annotations

from dataclasses import replace

from qcompiler.config.methods import AWQ, GPTQ, HQQ, MixedInt8, OutlierSplit, Rotation, SmoothQuant
from qcompiler.config.recipe import Recipe
from qcompiler.config.schemes import ActivationScheme, LayerOverride, WeightScheme
from qcompiler.core.errors import ConfigError, ConfigTypeError

PRESETS: dict[str, Recipe] = {
    "w8a8-dynamic": Recipe(
        name="w8a8-dynamic",
        weight=WeightScheme(bits=8, granularity="per_channel", symmetric=True),
        activation=ActivationScheme(bits=8, granularity="per_token", symmetric=True),
    ),
}


def _static(name: str, observer: str, **kwargs) -> Recipe:
    return Recipe(
        name=name,
        weight=WeightScheme(bits=8, granularity="per_channel", symmetric=True),
        activation=ActivationScheme(bits=8, granularity="per_tensor", dynamic=False, observer=observer, **kwargs),
    )


PRESETS.update({
    "w8a8-static": _static("w8a8-static", "minmax"),
    "w8a8-smoothquant": replace(_static("w8a8-smoothquant", "minmax"), smoothquant=SmoothQuant(alpha=0.5)),
    "w8a8-smoothquant-auto": replace(_static("w8a8-smoothquant-auto", "minmax"), smoothquant=SmoothQuant(alpha="auto")),
    "w8a8-ocs": replace(_static("w8a8-ocs", "minmax"), split_outliers=OutlierSplit()),
    "llm-int8": replace(_static("llm-int8", "minmax"), mixed_int8=MixedInt8()),
    # the best combination measured on SmolLM2 (README): split the largest activation channels, then
    # keep the columns still above 4.0 in float
    "w8a8-ocs-llm-int8": replace(_static("w8a8-ocs-llm-int8", "minmax"), split_outliers=OutlierSplit(),
                                 mixed_int8=MixedInt8(threshold=4.0)),
    "w8a8-static-ema": _static("w8a8-static-ema", "ema"),
    "w8a8-static-percentile": _static("w8a8-static-percentile", "percentile", percentile=99.99),
    "w8a8-static-mse": _static("w8a8-static-mse", "mse"),
    "w8a8-static-kl": _static("w8a8-static-kl", "kl"),
    # per-token dynamic activations after SmoothQuant (one of the SmoothQuant paper's settings): the
    # migration is calibrated, the activations' ranges are not
    "w8a8-dynamic-smoothquant": replace(PRESETS["w8a8-dynamic"], name="w8a8-dynamic-smoothquant",
                                        smoothquant=SmoothQuant(alpha=0.5)),
    "w8a8-dynamic-smoothquant-auto": replace(PRESETS["w8a8-dynamic"], name="w8a8-dynamic-smoothquant-auto",
                                             smoothquant=SmoothQuant(alpha="auto")),
})
PRESETS.update({  # the residual stream rotated (data-free), then per-token dynamic W8A8: no calibration
    "w8a8-dynamic-rotated": replace(PRESETS["w8a8-dynamic"], name="w8a8-dynamic-rotated", rotation=Rotation()),
})
PRESETS.update({
    # static per-tensor W8A8 after the residual-stream rotation with the down projections' inputs left unrotated
    # (their massive activations stay in a few channels), then OCS and LLM.int8() as in w8a8-ocs-llm-int8: the
    # rotation makes static ranges fit q/k/v/o/gate/up, the float columns take down_proj's outliers; MSE-chosen
    # ranges (README)
    "w8a8-rotated-ocs-llm-int8": replace(_static("w8a8-rotated-ocs-llm-int8", "mse"), split_outliers=OutlierSplit(),
                                         mixed_int8=MixedInt8(threshold=4.0), rotation=Rotation(online=False)),
})
PRESETS.update({  # llm-compressor's W8A8 recipe: SmoothQuant, then GPTQ rounds the smoothed weights
    "w8a8-smoothquant-gptq": replace(PRESETS["w8a8-smoothquant"], name="w8a8-smoothquant-gptq", rounding=GPTQ()),
    "w8a8-dynamic-smoothquant-gptq": replace(PRESETS["w8a8-dynamic-smoothquant-auto"],
                                             name="w8a8-dynamic-smoothquant-gptq", rounding=GPTQ()),
})



def _weight_only(name: str, bits: int = 4, group_size: int = 128, **kwargs) -> Recipe:
    return Recipe(
        name=name,
        weight=WeightScheme(bits=bits, granularity="per_group", group_size=group_size, symmetric=False,
                            fit_group=True),
        activation=None,
        **kwargs,
    )


PRESETS.update({
    # 4-bit weights in groups of 128 along the input dimension (asymmetric), float activations
    "w4a16-rtn": _weight_only("w4a16-rtn"),
    "w4a16-gptq": _weight_only("w4a16-gptq", rounding=GPTQ()),
    "w4a16-awq": _weight_only("w4a16-awq", rounding=AWQ()),
    "w4a16-hqq": _weight_only("w4a16-hqq", rounding=HQQ()),
    # rotation then GPTQ (activation order) on the rotated weights: QuaRot's 4-bit weight recipe
    "w4a16-rotated-gptq": _weight_only("w4a16-rotated-gptq", rounding=GPTQ(act_order=True, clip_grid=20),
                                       rotation=Rotation()),
    # W4A8: the rotation, then GPTQ rounds 4-bit weights per output channel on all 16 levels (one scale per
    # channel: the int8 GEMM applies it after the integer sum), per-token int8 activations on the int8 kernels
    "w4a8-dynamic-rotated-gptq": replace(
        PRESETS["w8a8-dynamic"], name="w4a8-dynamic-rotated-gptq",
        weight=WeightScheme(bits=4, granularity="per_channel", symmetric=True, full_range=True),
        rounding=GPTQ(act_order=True, clip_grid=20), rotation=Rotation()),
})


def _gguf(name: str, bits: int, symmetric: bool, full_range: bool = False, **kwargs) -> Recipe:
    """Weights in blocks of 32 input channels with fp16 scales (and, asymmetric, fp16 offsets): the
    layout of GGUF's Q8_0 / Q4_0 / Q4_1, so ``qcompiler export --format gguf`` writes these recipes'
    integers exactly. Weight-only in process; llama.cpp quantizes the activations itself."""
    return Recipe(name=name, weight=WeightScheme(bits=bits, granularity="per_group", group_size=32,
                                                 symmetric=symmetric, fp16_scales=True, full_range=full_range),
                  activation=None, **kwargs)


PRESETS.update({
    "w8a16-q8_0": _gguf("w8a16-q8_0", 8, True),  # GGUF Q8_0: int8 symmetric, one fp16 scale per 32
    # GGUF Q4_0: symmetric int4 on all 16 levels [-8, 7], as Q4_0 stores d * (nibble - 8)
    # GPTQ with activation order: on SmolLM2 into Q4_0, llama-perplexity 27.11 with it, 29.69 without
    # (llama-quantize's own Q4_0: 29.79)
    "w4a16-q4_0-gptq": _gguf("w4a16-q4_0-gptq", 4, True, full_range=True, rounding=GPTQ(act_order=True)),
    # AWQ with its scales folded into the norms and the value/up projections' rows (exports)
    "w4a16-q4_0-awq": _gguf("w4a16-q4_0-awq", 4, True, full_range=True, rounding=AWQ()),
    "w4a16-q4_1-gptq": _gguf("w4a16-q4_1-gptq", 4, False, rounding=GPTQ(act_order=True)),  # GGUF Q4_1: d * q + m
    "w4a16-q4_1-hqq": _gguf("w4a16-q4_1-hqq", 4, False, rounding=HQQ()),
})

DEFAULT_RECIPE = "w8a8-dynamic"


def resolve_recipe(recipe: str | Recipe | None) -> Recipe:
    if recipe is None:
        return PRESETS[DEFAULT_RECIPE]
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        if recipe not in PRESETS:
            raise ConfigError(f"unknown recipe {recipe!r}; the presets are: {', '.join(sorted(PRESETS))}")
        return PRESETS[recipe]
    raise ConfigTypeError(f"recipe must be a preset name or a qcompiler.Recipe, got {type(recipe).__name__}")


# What generation (qcompiler.compile) gives the LM head by default: int8 weights per output channel,
# float activations. Measured on SmolLM2 (README): lossless in perplexity, where int8 activations cost
# +0.5%; it is the largest single read of a decode step (49152 x 576), so int8 quarters its bytes.
LM_HEAD_INT8 = LayerOverride("lm_head", weight=WeightScheme(bits=8, granularity="per_channel", symmetric=True),
                             weight_only=True)


def with_int8_lm_head(recipe: Recipe) -> Recipe:
    """``recipe`` with its LM head quantized as :data:`LM_HEAD_INT8` instead of kept float. Recipes that
    quantize the head already, that do not skip it, whose rounding (HQQ) needs asymmetric weights
    everywhere, or whose rounding (GPTQ, AWQ) comes from calibration statistics (they are keyed to the
    recipe's skip list and hold no rounding of the head) are returned as they are."""
    if "lm_head" not in recipe.skip or isinstance(recipe.rounding, HQQ) or recipe.data_driven_rounding:
        return recipe
    if any(o.pattern == "lm_head" for o in recipe.overrides):
        return recipe
    return replace(recipe, skip=tuple(p for p in recipe.skip if p != "lm_head"),
                   overrides=(*recipe.overrides, LM_HEAD_INT8))
