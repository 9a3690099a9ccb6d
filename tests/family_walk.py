"""
The walk over every MoE family (``test_every_family*.py``): what each family
is expected to do on each path a user takes, and the check of one path.

The paths (README): ``recipes/mone_25.yaml``, ``mone_w4.yaml`` and
``mone_fp8.yaml`` through ``oneshot``, saved and reloaded with
``mone_modifier.from_pretrained`` (logits equal to the in-memory model); and
``novice: drop``, saved and reloaded with plain transformers. A family passes
a path or is refused on it before calibration, by a message that names the
family and the cause, its checkpoint untouched.
"""

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import mone_modifier
from devices import DEVICE, assert_close
from family_configs import auto_class
from helpers import fp8_rounded_logits, run_oneshot, tree_digest
from mone_modifier import MoNEPruningModifier
from mone_modifier.tiny_moe import NUM_EXPERTS, calibration_ids

RECIPES = Path(__file__).parent.parent / "recipes"
PATHS = {
    "mone": "MoNE 25% + reload",
    "w4a16": "W4A16 (GPTQ)",
    "fp8": "FP8",
    "drop": "drop",
}
RECIPE = {"mone": "mone_25", "w4a16": "mone_w4", "fp8": "mone_fp8"}

# two samples of 32 tokens, 128 routes over 8 experts: enough to measure the
# tiny models, and oneshot's cost grows with the samples over ~250 paths
SAMPLES = calibration_ids(2, 32)

NOT_LINEARISED = r"llm-compressor 0\.14 does not linearise its experts"
LINEARISATION_FAILS = r"llm-compressor 0\.14 cannot linearise the experts"
ROUTING_UNREAD = r"llm-compressor 0\.14 cannot read its routing"


@dataclass(frozen=True)
class Family:
    """
    What the walk expects of one family.

    :param refused: path -> regular expression of the refusal, for the paths
        the family is refused on; it works on the others
    """

    refused: dict[str, str] | None = None

    def refusal(self, path: str) -> str | None:
        return (self.refused or {}).get(path)

    def cell(self, path: str) -> str:
        """The README table's cell for ``path``."""
        return "refused" if self.refusal(path) else "yes"


def refused_everywhere(pattern: str) -> Family:
    return Family(refused=dict.fromkeys(PATHS, pattern))


_WORKING = """
    afmoe axk1 axk2 cohere2_moe deepseek_ocr2 deepseek_v2 deepseek_v3 deepseek_v32
    deepseek_v4 ernie4_5_moe exaone_moe flex_olmo glm4_moe glm4_moe_lite glm4v_moe
    glm5_next glm_moe_dsa gpt_oss granitemoe granitemoe_swa granitemoehybrid
    granitemoeshared hy_v3 hy_v4 inkling_text jamba kimi_k25
    kimi_linear laguna lfm2_moe mellum mimo_v2_flash minimax minimax_m2 mistral4
    mixtral nemotron_h olmoe phimoe qwen2_moe qwen3_5_moe qwen3_5_moe_text qwen3_moe
    qwen3_next qwen3_vl_moe qwen4_exp qwen4_exp_text
    solar_open zaya
""".split()

FAMILIES: dict[str, Family] = {
    **{family: Family() for family in _WORKING},
    "qwen3_omni_moe_thinker": refused_everywhere(
        r"cannot prune qwen3_omni_moe_thinker models: .* traces its forward to "
        r"a graph that runs no decoder layer"
    ),
    "inkling_mm_model": Family(
        refused=dict.fromkeys(
            ["mone", "w4a16", "fp8"],
            r"cannot give inkling_mm_model models novices: .* would not load back",
        )
    ),
    # MoE layers that are not one fused experts module beside a router
    **dict.fromkeys(
        ["aria", "aria_text", "dbrx", "jetmoe", "longcat_flash", "step3p7"],
        refused_everywhere(NOT_LINEARISED),
    ),
    # llm-compressor's own linearisation raises
    **dict.fromkeys(
        ["llama4", "llama4_text", "ernie4_5_vl_moe"],
        refused_everywhere(LINEARISATION_FAILS),
    ),
    "gemma4_text": refused_everywhere(ROUTING_UNREAD),
    **dict.fromkeys(
        ["minimax_m3_vl", "minimax_m3_vl_text"],
        refused_everywhere(
            r"cannot prune minimax_m3_vl\w* models: .* lack their clamped SwiGLU"
        ),
    ),
}

_TEXT_HALF = "the text model of {}, which the walk takes whole"
# MoE model types the walk reaches through another one, or that no oneshot
# pipeline takes, with the reason
NOT_WALKED: dict[str, str] = {
    "deepseek_ocr2_text": _TEXT_HALF.format("deepseek_ocr2"),
    "ernie4_5_vl_moe_text": _TEXT_HALF.format("ernie4_5_vl_moe"),
    "glm4v_moe_text": _TEXT_HALF.format("glm4v_moe"),
    "glm5_next_text": _TEXT_HALF.format("glm5_next"),
    "qwen3_vl_moe_text": _TEXT_HALF.format("qwen3_vl_moe"),
    "qwen3_omni_moe_text": _TEXT_HALF.format("qwen3_omni_moe_thinker"),
    "step3p5": _TEXT_HALF.format("step3p7"),
    "qwen3_omni_moe": "an omni model whose text part, the thinker, is walked",
    "qwen3_omni_moe_talker_text": "the omni model's speech-code generator",
    "nllb-moe": "an encoder-decoder model",
    "switch_transformers": "an encoder-decoder model",
    "openai_privacy_filter": "a token classifier",
    "doge": (
        "dense by default; its MoE variant (is_moe=True) fails in transformers "
        "5.17's own forward"
    ),
}


def params(paths: list[str]) -> list[tuple[str, str]]:
    """(family, path) test parameters."""
    return [(family, path) for family in FAMILIES for path in paths]


def check_path(
    family: str,
    path: str,
    source: Path,
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
):
    """Run ``path`` on ``family``'s tiny model at ``source`` and check what
    ``FAMILIES`` expects of it."""
    if (refusal := FAMILIES[family].refusal(path)) is not None:
        calibrated = []
        monkeypatch.setattr(
            MoNEPruningModifier,
            "on_calibration_start",
            lambda self, *args, **kwargs: calibrated.append(True),
        )
        _check_refused(family, source, SAMPLES, path_recipe(path), refusal)
        assert not calibrated, "the refusal came after calibration started"
        return
    model = prune_family(family, source, SAMPLES, path_recipe(path))
    if path == "fp8":
        expected = fp8_rounded_logits(model, SAMPLES)
    else:
        with torch.no_grad():
            expected = model(input_ids=SAMPLES).logits
    model.save_pretrained(out)
    if path == "drop":
        loaded = auto_class(family).from_pretrained(out)
        assert _expert_counts(loaded) == {NUM_EXPERTS - 2}
    else:
        loaded = mone_modifier.from_pretrained(out)
        assert loaded.config.get_text_config().approximate_experts
    with torch.no_grad():
        logits = loaded.to(DEVICE)(input_ids=SAMPLES.to(DEVICE)).logits
    # 1e-4: GPT-OSS's tiny model reaches 2.3e-5, its reloaded experts adding
    # in another order; a wrong tensor moves the logits (about 5) by far more
    assert_close(logits, expected, rtol=0, atol=1e-4)


def path_recipe(path: str):
    if path == "drop":
        return MoNEPruningModifier(sparsity=0.25, novice="drop")
    return str(RECIPES / f"{RECIPE[path]}.yaml")


def prune_family(family: str, source: Path, samples: torch.Tensor, recipe):
    """oneshot as a user runs it: a causal LM by its path; another model
    (vision-language) loaded with its own class and given its processor."""
    model_class = auto_class(family)
    if model_class is AutoModelForCausalLM:
        return run_oneshot(source, samples, recipe)
    return run_oneshot(
        model_class.from_pretrained(source),
        samples,
        recipe,
        processor=AutoTokenizer.from_pretrained(source),
    )


def _check_refused(family: str, source: Path, samples: torch.Tensor, recipe, pattern):
    before = tree_digest(source)
    with pytest.raises(ValueError, match=pattern) as error:
        prune_family(family, source, samples, recipe)
    assert family in str(error.value), "the refusal does not name the family"
    assert tree_digest(source) == before


def _expert_counts(model) -> set[int]:
    text = model.config.get_text_config()
    return {
        getattr(text, key)
        for key in ("num_experts", "num_local_experts", "n_routed_experts")
        if isinstance(getattr(text, key, None), int)
    }
