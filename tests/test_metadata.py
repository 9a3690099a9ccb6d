"""
read_novices on configs alone (no model): malformed metadata of any shape is a
ValueError that names the part at fault, and valid metadata of either layout
reads back exactly what was written.
"""

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import PretrainedConfig

from mone_format import (
    LayerNovices,
    read_novices,
    record_novices,
    recorded_novices,
)

NUM_EXPERTS = 8
TARGET = "model.layers.0.mlp.experts"


def replacement(name: str = "constant") -> dict:
    return {"format": "constant-v1", "tensors": {"value": name}}


def target(replacements: dict) -> dict:
    return {"weight_layout": "compact_retained_experts", "replacements": replacements}


def substitution(targets: dict, key: str = "compression_config") -> dict:
    """Config fields holding an expert_substitution with these targets."""
    return {
        key: {
            "transform_config": {
                "expert_substitution": {"version": 1, "targets": targets}
            }
        }
    }


def read(fields: dict) -> dict[int, LayerNovices]:
    return read_novices(PretrainedConfig(**fields), NUM_EXPERTS)


VALID_APPROXIMATE = {"approximate_experts": {"0": [3, 5], "2": [1]}}
VALID_SUBSTITUTION = substitution(
    {
        TARGET: target({"3": replacement("a"), "5": replacement("b")}),
        "model.layers.2.mlp.experts": target({"1": replacement("c")}),
    }
)


def test_valid_layouts_read_as_documented():
    assert read(VALID_APPROXIMATE) == {
        0: LayerNovices({3: None, 5: None}),
        2: LayerNovices({1: None}),
    }
    expected = {
        0: LayerNovices({3: "a", 5: "b"}, compact=True),
        2: LayerNovices({1: "c"}, compact=True),
    }
    assert read(VALID_SUBSTITUTION) == expected
    expert_substitution = VALID_SUBSTITUTION["compression_config"]
    assert read({"quantization_config": expert_substitution}) == expected
    assert read({}) == {}
    assert read({"approximate_experts": {}, **VALID_SUBSTITUTION}) == expected


def with_replacement(entry) -> dict:
    return substitution({TARGET: target({"3": entry})})


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"approximate_experts": [[1]]}, r"approximate_experts must be a dict"),
        ({"approximate_experts": []}, r"approximate_experts must be a dict"),
        ({"approximate_experts": {"x": [1]}}, r"layer 'x' must be a non-negative"),
        ({"approximate_experts": {"1.5": [1]}}, r"layer '1\.5' must be a non-neg"),
        ({"approximate_experts": {"-1": [1]}}, r"layer '-1' must be a non-negative"),
        ({"approximate_experts": {"01": [1]}}, r"layer '01' must be a non-negative"),
        (
            {"approximate_experts": {"0": "12"}},
            r"layer '0': novices must be a list of integer expert ids, got '12'",
        ),
        ({"approximate_experts": {"0": [True]}}, r"integer expert ids, got \[True\]"),
        ({"approximate_experts": {"0": [1.0]}}, r"integer expert ids, got \[1\.0\]"),
        ({"approximate_experts": {"0": [None]}}, r"integer expert ids, got \[None\]"),
        ({"approximate_experts": {"0": [[1]]}}, r"integer expert ids, got \[\[1\]\]"),
        ({"approximate_experts": {"0": ["1"]}}, r"integer expert ids, got \['1'\]"),
        ({"approximate_experts": {"0": None}}, r"integer expert ids, got None"),
        ({"approximate_experts": {"0": [8]}}, r"distinct expert ids in \[0, 8\)"),
        ({"approximate_experts": {"0": [1, 1]}}, r"distinct expert ids"),
        ({"compression_config": [1]}, r"compression_config must be a dict"),
        (
            {"compression_config": {"transform_config": "x"}},
            r"compression_config\.transform_config must be a dict",
        ),
        (
            {"compression_config": {"transform_config": {"expert_substitution": []}}},
            r"expert_substitution must be a dict",
        ),
        (
            {"compression_config": {"transform_config": {"expert_substitution": {}}}},
            r"expert_substitution version None is not supported",
        ),
        (
            {
                "compression_config": {
                    "transform_config": {
                        "expert_substitution": {"version": True, "targets": {}}
                    }
                }
            },
            r"expert_substitution version True is not supported",
        ),
        (substitution(None), r"expert_substitution targets must be a dict"),
        (substitution([TARGET]), r"expert_substitution targets must be a dict"),
        (
            substitution({TARGET: [1]}),
            r"target 'model\.layers\.0\.mlp\.experts' must be a dict",
        ),
        (
            substitution({TARGET: {"weight_layout": "compact_retained_experts"}}),
            r"target 'model\.layers\.0\.mlp\.experts' replacements must be a dict",
        ),
        (
            substitution({TARGET: target({"3": replacement(), "x": replacement()})}),
            r"target 'model\.layers\.0\.mlp\.experts': expert 'x' must be a non-neg",
        ),
        (with_replacement([1]), r"experts', expert '3' must be a dict"),
        (
            with_replacement({"format": "constant-v1"}),
            r"expert '3' tensors must be a dict with string keys, got None",
        ),
        (
            with_replacement({"format": "constant-v1", "tensors": {}}),
            r"expert '3': tensors\.value must be a checkpoint tensor name, got None",
        ),
        (with_replacement(replacement(5)), r"tensors\.value must be a checkpoint"),
        (with_replacement(replacement("")), r"tensors\.value must be a checkpoint"),
        (
            substitution(
                {
                    TARGET: target({"1": replacement()}),
                    "layers.0.mlp.experts": target({"2": replacement()}),
                }
            ),
            r"target 'layers\.0\.mlp\.experts': another target names layer 0 too",
        ),
        (
            {**VALID_APPROXIMATE, **VALID_SUBSTITUTION},
            r"both approximate_experts and expert_substitution",
        ),
    ],
)
def test_malformed_metadata_names_the_problem(fields, message):
    with pytest.raises(ValueError, match=message):
        read(fields)


# Keys that sometimes spell a layout's own names or (non-)ids, so that generated
# dicts reach past the first check.
KEYS = st.sampled_from(
    ["0", "3", "7", "8", "01", "-1", "1.5", "x", "version", "targets", "value"]
    + ["format", "tensors", "replacements", "weight_layout", TARGET]
) | st.text(max_size=4)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-1, max_value=NUM_EXPERTS)
    | st.integers()
    | st.floats()
    | st.sampled_from(["constant-v1", "compact_retained_experts"])
    | st.text(max_size=4)
)
JSON = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4)
    ),
    max_leaves=12,
)

SUBSTITUTION = ("compression_config", "transform_config", "expert_substitution")
TARGET_PATH = SUBSTITUTION + ("targets", TARGET)
REPLACEMENT = TARGET_PATH + ("replacements", "3")
# Places in a valid config of either layout (the first key picks which).
PLACES = [
    ("approximate_experts",),
    ("approximate_experts", "0"),
    SUBSTITUTION[:1],
    SUBSTITUTION[:2],
    SUBSTITUTION,
    SUBSTITUTION + ("version",),
    SUBSTITUTION + ("targets",),
    TARGET_PATH,
    TARGET_PATH + ("weight_layout",),
    TARGET_PATH + ("replacements",),
    REPLACEMENT,
    REPLACEMENT + ("format",),
    REPLACEMENT + ("tensors",),
    REPLACEMENT + ("tensors", "value"),
]
DICT_PLACES = list(dict.fromkeys(place[:-1] for place in PLACES if len(place) > 1))


def valid_fields(place: tuple) -> dict:
    if place[0] == "approximate_experts":
        return copy.deepcopy(VALID_APPROXIMATE)
    return copy.deepcopy(VALID_SUBSTITUTION)


def put(fields: dict, path: tuple, value) -> dict:
    parent = fields
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return fields


def read_or_refuse(fields: dict):
    """What read_novices gives, which must be well formed, or None on a
    ValueError; any other exception fails the test."""
    try:
        novices = read(fields)
    except ValueError as error:
        assert str(error)
        return None
    assert isinstance(novices, dict)
    for layer, entry in novices.items():
        assert type(layer) is int and layer >= 0
        assert isinstance(entry, LayerNovices)
        assert len(entry.novices) < NUM_EXPERTS
        for expert, name in entry.novices.items():
            assert type(expert) is int and 0 <= expert < NUM_EXPERTS
            assert (isinstance(name, str) and name) if entry.compact else name is None
    return novices


@settings(max_examples=200, deadline=None)
@given(place=st.sampled_from(PLACES), value=JSON)
def test_any_value_anywhere_reads_or_is_a_value_error(place, value):
    read_or_refuse(put(valid_fields(place), place, value))


@settings(max_examples=200, deadline=None)
@given(place=st.sampled_from(DICT_PLACES), key=KEYS, value=JSON)
def test_any_extra_entry_reads_or_is_a_value_error(place, key, value):
    read_or_refuse(put(valid_fields(place), place + (key,), value))


@st.composite
def novices_by_layer(draw) -> dict[int, list[int]]:
    layers = draw(st.lists(st.integers(0, 200), unique=True, max_size=5))
    ids = st.lists(
        st.integers(0, NUM_EXPERTS - 1), unique=True, max_size=NUM_EXPERTS - 1
    )
    return {layer: draw(ids) for layer in layers}


@settings(max_examples=200, deadline=None)
@given(novices=novices_by_layer(), nested=st.booleans())
def test_approximate_experts_round_trip(novices, nested):
    written = {str(layer): ids for layer, ids in novices.items()}
    expected = {
        layer: LayerNovices(dict.fromkeys(ids)) for layer, ids in novices.items()
    }
    if nested:
        fields = {"text_config": PretrainedConfig(approximate_experts=written)}
    else:
        fields = {"approximate_experts": written}
    assert read(fields) == expected

    config = PretrainedConfig()
    if nested:
        config = PretrainedConfig(text_config=config)
    for layer, ids in novices.items():
        record_novices(config, layer, ids)
    assert recorded_novices(config) == {k: sorted(v) for k, v in novices.items()}
    assert read_novices(config, NUM_EXPERTS) == expected


@settings(max_examples=200, deadline=None)
@given(
    novices=novices_by_layer(),
    prefix=st.sampled_from(["model.layers", "model.language_model.layers", "h"]),
    key=st.sampled_from(["compression_config", "quantization_config"]),
    data=st.data(),
)
def test_expert_substitution_round_trip(novices, prefix, key, data):
    names = st.text(min_size=1, max_size=20)
    named = {
        layer: {expert: data.draw(names) for expert in ids}
        for layer, ids in novices.items()
    }
    targets = {
        f"{prefix}.{layer}.mlp.experts": target(
            {str(expert): replacement(name) for expert, name in experts.items()}
        )
        for layer, experts in named.items()
    }
    assert read(substitution(targets, key)) == {
        layer: LayerNovices(experts, compact=True) for layer, experts in named.items()
    }


# Values a valid id, layer key or tensor name could be mistaken for; each must
# be refused rather than read as the id or name it resembles.
ID_MISSES = st.sampled_from([True, False, 1.0, 3.0, "3", None, [3], -1, NUM_EXPERTS])
KEY_MISSES = st.sampled_from(["01", "-1", "1.5", " 1", "1 ", "x", "", "1e0", "٣"])
NAME_MISSES = st.sampled_from([None, "", 0, ["a"], {"value": "a"}])
VERSION_MISSES = st.sampled_from([True, 1.0, "1", [1], None, 2])
HAS_NOVICES = novices_by_layer().filter(lambda novices: any(novices.values()))


@settings(max_examples=200, deadline=None)
@given(novices=HAS_NOVICES, data=st.data())
def test_a_near_miss_in_approximate_experts_is_refused(novices, data):
    written = {str(layer): ids for layer, ids in novices.items()}
    layer = data.draw(st.sampled_from([k for k, ids in written.items() if ids]))
    if data.draw(st.booleans()):
        ids = written[layer]
        ids[data.draw(st.integers(0, len(ids) - 1))] = data.draw(ID_MISSES)
    else:
        written[data.draw(KEY_MISSES)] = written.pop(layer)
    with pytest.raises(ValueError, match="approximate_experts layer"):
        read({"approximate_experts": written})


@settings(max_examples=200, deadline=None)
@given(
    novices=HAS_NOVICES,
    spot=st.sampled_from(["version", "key", "name"]),
    data=st.data(),
)
def test_a_near_miss_in_expert_substitution_is_refused(novices, spot, data):
    targets = {
        f"model.layers.{layer}.mlp.experts": target(
            {str(expert): replacement(f"n{expert}") for expert in ids}
        )
        for layer, ids in novices.items()
    }
    fields = substitution(targets)
    layer = data.draw(st.sampled_from([k for k, ids in novices.items() if ids]))
    replacements = targets[f"model.layers.{layer}.mlp.experts"]["replacements"]
    expert = data.draw(st.sampled_from(sorted(replacements)))
    if spot == "version":
        put(fields, SUBSTITUTION + ("version",), data.draw(VERSION_MISSES))
    elif spot == "key":
        replacements[data.draw(KEY_MISSES)] = replacements.pop(expert)
    else:
        replacements[expert]["tensors"]["value"] = data.draw(NAME_MISSES)
    with pytest.raises(ValueError, match="expert_substitution"):
        read(fields)
