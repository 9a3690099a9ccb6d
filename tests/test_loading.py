"""mone_modifier.from_pretrained: exact reloads, compact experts, bad metadata."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mone_modifier
from devices import DEVICE, assert_close
from helpers import (
    PROJECTION_FAMILIES,
    run_oneshot,
    to_expert_substitution,
)
from mone_modifier import MoNEPruningModifier
from mone_modifier.tiny_moe import FAMILIES, NUM_EXPERTS, build_tiny_moe
from mone_transformers.pruned_experts import NoviceMoEExperts

RECIPES = Path(__file__).parent.parent / "recipes"
QPARAMS = ("weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")

RECIPE_SPARSITY = {"mone_25": 0.25, "mone_50": 0.5}


def pruned_and_saved(family, sparsity, tiny_moe, samples, out):
    model = run_oneshot(
        tiny_moe(family), samples, MoNEPruningModifier(sparsity=sparsity)
    )
    with torch.no_grad():
        logits = model(input_ids=samples).logits
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    return model, logits, params


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sparsity", [0.25, 0.5])
def test_reload_equals_in_memory_model(family, sparsity, tiny_moe, samples, tmp_path):
    model, logits, params = pruned_and_saved(
        family, sparsity, tiny_moe, samples, tmp_path / "out"
    )
    loaded = mone_modifier.from_pretrained(tmp_path / "out").to(DEVICE)
    with torch.no_grad():
        reloaded = loaded(input_ids=samples.to(DEVICE)).logits
    assert_close(reloaded, logits, rtol=0, atol=1e-5)

    # the pruned experts were never built: the same parameter count as the
    # in-memory pruned model, and each layer's fused module holds E - P experts
    assert sum(p.numel() for p in loaded.parameters()) == params
    kept = NUM_EXPERTS - round(sparsity * NUM_EXPERTS)
    for index, ids in model.config.approximate_experts.items():
        experts = loaded.model.layers[int(index)].mlp.experts
        assert isinstance(experts, NoviceMoEExperts)
        assert experts.retained.gate_up_proj.shape[0] == kept
        retained = experts.route_id < kept
        assert retained.nonzero().squeeze(1).tolist() == sorted(
            set(range(NUM_EXPERTS)) - set(ids)
        )


def test_checkpoint_without_novices_loads_plainly(tiny_moe, samples, tmp_path):
    model = run_oneshot(
        tiny_moe("olmoe"), samples, MoNEPruningModifier(sparsity=0.25, novice="drop")
    )
    with torch.no_grad():
        expected = model(input_ids=samples).logits
    model.save_pretrained(tmp_path / "out")
    loaded = mone_modifier.from_pretrained(tmp_path / "out").to(DEVICE)
    assert_close(
        loaded(input_ids=samples.to(DEVICE)).logits, expected, rtol=0, atol=1e-5
    )


def test_authors_init_tokens_entry_is_ignored_with_a_log_line(
    tiny_moe, samples, tmp_path, log_lines
):
    _, logits, _ = pruned_and_saved(
        "qwen2_moe", 0.25, tiny_moe, samples, tmp_path / "out"
    )
    config_path = tmp_path / "out" / "config.json"
    config = json.loads(config_path.read_text())
    config["approximate_expert_init_tokens"] = {"0": [1, 2, 3]}
    config_path.write_text(json.dumps(config))
    loaded = mone_modifier.from_pretrained(tmp_path / "out").to(DEVICE)
    assert_close(loaded(input_ids=samples.to(DEVICE)).logits, logits, rtol=0, atol=1e-5)
    assert any("ignoring approximate_expert_init_tokens" in line for line in log_lines)


@pytest.fixture(scope="module")
def saved_checkpoint(tmp_path_factory, tiny_moe, samples):
    out = tmp_path_factory.mktemp("ckpt") / "out"
    model = run_oneshot(
        tiny_moe("qwen3_moe"), samples, MoNEPruningModifier(sparsity=0.25)
    )
    model.save_pretrained(out)
    return out, {int(k): v for k, v in model.config.approximate_experts.items()}


def corrupt(saved_checkpoint, tmp_path, edit_config=None, edit_tensors=None):
    source, novices = saved_checkpoint
    out = tmp_path / "corrupt"
    out.mkdir()
    for file in source.iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    if edit_config:
        config = json.loads((out / "config.json").read_text())
        edit_config(config, novices)
        (out / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(out / "model.safetensors")
        edit_tensors(tensors, novices)
        save_file(tensors, out / "model.safetensors")
    return out


def novice_key(layer, expert):
    return f"model.layers.{layer}.mlp.experts.{expert}.approx_value"


def set_novices(layer, ids):
    def edit(config, novices):
        config["approximate_experts"][str(layer)] = ids

    return edit


@pytest.mark.parametrize(
    "edit_config,edit_tensors,message",
    [
        (set_novices(0, [3, NUM_EXPERTS]), None, r"distinct expert ids in \[0, 8\)"),
        (set_novices(0, [3, 3]), None, "distinct expert ids"),
        (set_novices(0, list(range(NUM_EXPERTS))), None, "leave at least one expert"),
        (
            None,
            lambda t, n: t.pop(novice_key(0, n[0][0])),
            r"novice \d must have exactly one tensor 'approx_value', found none",
        ),
        (
            None,
            lambda t, n: t.__setitem__(novice_key(0, n[0][0]), torch.zeros(3)),
            r"has shape \(3,\), expected \(64,\)",
        ),
        (
            None,
            lambda t, n: t.__setitem__(
                novice_key(0, 7 if 7 not in n[0] else 6), torch.zeros(64)
            ),
            r"retained expert \d needs its weights and no 'approx_value'",
        ),
        (
            None,
            lambda t, n: t.__setitem__(novice_key(0, NUM_EXPERTS), torch.zeros(64)),
            r"tensors of expert 8, but the router has 8 experts",
        ),
        (
            set_novices(0, []),
            None,
            r"tensors without a parameter|retained expert \d needs its weights",
        ),
        (
            set_novices(2, [1, 4]),  # the test model has layers 0 and 1
            None,
            r"novices for layers \[2\], which are not MoE layers of this model",
        ),
    ],
)
def test_malformed_metadata_gets_a_clear_error(
    edit_config, edit_tensors, message, saved_checkpoint, tmp_path
):
    out = corrupt(saved_checkpoint, tmp_path, edit_config, edit_tensors)
    with pytest.raises(ValueError, match=message):
        mone_modifier.from_pretrained(out)


def test_novices_on_a_dense_layer_get_a_clear_error(tiny_moe, samples, tmp_path):
    model = run_oneshot(
        tiny_moe("deepseek_v3"), samples, MoNEPruningModifier(sparsity=0.25)
    )
    model.save_pretrained(tmp_path / "out")
    config_path = tmp_path / "out" / "config.json"
    config = json.loads(config_path.read_text())
    config["approximate_experts"]["0"] = [1, 4]  # layer 0 is dense
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"layers \[0\], which are not MoE layers"):
        mone_modifier.from_pretrained(tmp_path / "out")


def test_missing_directory_gets_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a checkpoint directory"):
        mone_modifier.from_pretrained(tmp_path / "no-such-checkpoint")


@pytest.mark.parametrize("family", PROJECTION_FAMILIES)
# mone_w4 (25%) and mone_fp8 reloads of every family: test_every_family_quantized
@pytest.mark.parametrize("recipe", ["mone_w4_50"])
def test_w4a16_reload_equals_in_memory_model(
    family, recipe, quantizable_moe, samples, tmp_path
):
    model = run_oneshot(
        quantizable_moe(family), samples, str(RECIPES / f"{recipe}.yaml")
    )
    with torch.no_grad():
        expected = model(input_ids=samples).logits
    params = sum(
        p.numel() for n, p in model.named_parameters() if not n.endswith(QPARAMS)
    )
    model.save_pretrained(tmp_path / "out")

    loaded = mone_modifier.from_pretrained(tmp_path / "out").to(DEVICE)
    with torch.no_grad():
        logits = loaded(input_ids=samples.to(DEVICE)).logits
    # GPTQ leaves weight-only quantized values in the weights: same numbers
    assert_close(logits, expected, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) == params


def test_reads_the_expert_substitution_layout(saved_checkpoint, samples, tmp_path):
    source, novices = saved_checkpoint
    expected = mone_modifier.from_pretrained(source)(input_ids=samples).logits
    to_expert_substitution(source, tmp_path / "b", novices)
    loaded = mone_modifier.from_pretrained(tmp_path / "b")
    torch.testing.assert_close(
        loaded(input_ids=samples).logits, expected, rtol=0, atol=0
    )


def test_both_layouts_at_once_is_refused(saved_checkpoint, tmp_path):
    source, novices = saved_checkpoint
    to_expert_substitution(source, tmp_path / "b", novices)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    config["approximate_experts"] = {str(k): v for k, v in novices.items()}
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match="both approximate_experts and expert_substitution"
    ):
        mone_modifier.from_pretrained(tmp_path / "b")


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("version", 2, "version 2 is not supported"),
        ("weight_layout", "logical", "weight_layout 'logical' is not supported"),
        ("format", "mlp-v1", "format 'mlp-v1' is not supported"),
    ],
)
def test_unsupported_expert_substitution(
    field, value, message, saved_checkpoint, tmp_path
):
    source, novices = saved_checkpoint
    to_expert_substitution(source, tmp_path / "b", novices)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    substitution = config["compression_config"]["transform_config"][
        "expert_substitution"
    ]
    target = next(iter(substitution["targets"].values()))
    if field == "version":
        substitution["version"] = value
    elif field == "weight_layout":
        target["weight_layout"] = value
    else:
        next(iter(target["replacements"].values()))["format"] = value
    (tmp_path / "b" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        mone_modifier.from_pretrained(tmp_path / "b")


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_every_experts_implementation_gives_the_same_logits(
    saved_checkpoint, samples, implementation
):
    """The default, grouped_mm, is compared with the in-memory model in the
    family walk; the others against it here."""
    loaded = mone_modifier.from_pretrained(saved_checkpoint[0]).to(DEVICE)
    assert loaded.config._experts_implementation == "grouped_mm"
    inputs = samples.to(DEVICE)
    with torch.no_grad():
        grouped = loaded(input_ids=inputs).logits
        loaded.set_experts_implementation(implementation)
        logits = loaded(input_ids=inputs).logits
    experts = loaded.model.layers[0].mlp.experts
    assert experts.retained.config._experts_implementation == implementation
    assert_close(logits, grouped, rtol=0, atol=1e-5)


def test_tied_embeddings(samples, tmp_path):
    path = build_tiny_moe("olmoe", tmp_path / "tied", tie_word_embeddings=True)
    model = run_oneshot(path, samples, MoNEPruningModifier(sparsity=0.25))
    with torch.no_grad():
        expected = model(input_ids=samples).logits
    model.save_pretrained(tmp_path / "out")
    loaded = mone_modifier.from_pretrained(tmp_path / "out").to(DEVICE)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        logits = loaded(input_ids=samples.to(DEVICE)).logits
    assert_close(logits, expected, rtol=0, atol=1e-5)
