"""
The MoNE authors' checkpoints (``MoNE-Pruning`` on the Hugging Face Hub,
written by github zxgx/mode-pd): their ``config.json`` names model types of
their own (``olmoe_compressed``, ``deepseek_v2_compressed``,
``deepseek_v3_compressed``) without an ``auto_map``, so nothing tells
transformers what they are. Their tensors and ``approximate_experts`` are
the stock family's and this package's layout, so the config alone needs
mapping: to the stock model type and architecture, without the fields of the
authors' other pruning methods, which are refused unless they change
nothing.
"""

__all__ = ["AUTHORS_MODEL_TYPES", "stock_config"]

AUTHORS_MODEL_TYPES = {
    "olmoe_compressed": "olmoe",
    "deepseek_v2_compressed": "deepseek_v2",
    "deepseek_v3_compressed": "deepseek_v3",
}
# the stock causal-LM class of each: their checkpoints name their own classes
# (OLMoE's is ``OlmoneForCausalLM``), which no engine knows
_STOCK_ARCHITECTURES = {
    "olmoe": "OlmoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}
# fields of the authors' other methods: refused when on, dropped when off
_OTHER_METHODS = ("flap_intermediate_sizes", "mod_type", "staged_mod_topk")
# per-layer widths left by the authors' width pruning, and the width each
# must equal for the stock model to hold the experts
_WIDTHS = {
    "routed_intermediate_sizes": ("intermediate_size", "moe_intermediate_size"),
    "shared_intermediate_sizes": ("moe_intermediate_size",),
}


def stock_config(config: dict) -> dict:
    """
    :param config: a checkpoint's ``config.json`` content
    :return: the stock family's config content for an authors' checkpoint;
        any other config unchanged
    :raises ValueError: naming the field, for an unknown ``*_compressed``
        type or a checkpoint the stock model cannot hold
    """
    model_type = config.get("model_type", "")
    if not model_type.endswith("_compressed"):
        return config
    if model_type not in AUTHORS_MODEL_TYPES:
        raise ValueError(
            f"config.json: model_type {model_type!r} is not one of the MoNE "
            f"authors' checkpoint types this package reads "
            f"({', '.join(AUTHORS_MODEL_TYPES)})"
        )
    stock = AUTHORS_MODEL_TYPES[model_type]
    if config.get("flap_intermediate_sizes") is not None:
        raise ValueError(
            "config.json: flap_intermediate_sizes (FLAP width pruning, with "
            "expert biases) is set; only checkpoints whose experts keep the "
            "family's width are read"
        )
    if config.get("mod_type"):
        raise ValueError(
            f"config.json: mod_type is {config['mod_type']!r} (the authors' "
            "mixture-of-depths routing, with a skip router); only checkpoints "
            "with mod_type null are read"
        )
    for key, widths in _WIDTHS.items():
        _check_uniform(config, key, widths)
    for key in ("num_experts", "n_routed_experts"):
        if isinstance(config.get(key), dict):
            raise ValueError(
                f"config.json: {key} differs per layer (experts dropped by the "
                f"authors' code); only checkpoints with every layer's router "
                f"at full width are read"
            )
    if any(
        any(tokens)
        for tokens in (config.get("approximate_expert_init_tokens") or {}).values()
    ):
        raise ValueError(
            "config.json: approximate_expert_init_tokens has non-zero counts: "
            "in the authors' code such novices keep changing their vectors at "
            "inference (novice evolving), which a fixed novice cannot reproduce"
        )
    dropped = {"auto_map", "model_type", *_WIDTHS, *_OTHER_METHODS}
    return (
        {"model_type": stock}
        | {k: v for k, v in config.items() if k not in dropped}
        | {"architectures": [_STOCK_ARCHITECTURES[stock]]}
    )


def _check_uniform(config: dict, key: str, width_keys: tuple[str, ...]):
    per_layer = config.get(key)
    if per_layer is None:
        return
    width_key = next(k for k in width_keys if k in config)
    expected = config[width_key]
    if key == "shared_intermediate_sizes":
        expected *= config.get("n_shared_experts") or 1
    for layer, sizes in per_layer.items():
        sizes = sizes if isinstance(sizes, list) else [sizes]
        if any(size != expected for size in sizes):
            raise ValueError(
                f"config.json: {key} of layer {layer} is {sizes}, not the "
                f"config's {width_key}={expected} for every expert; experts of "
                f"other widths (the authors' width pruning) are not read"
            )
