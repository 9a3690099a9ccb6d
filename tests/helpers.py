"""Running oneshot on the tiny models the way a user would."""

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from llmcompressor import oneshot
from llmcompressor.utils.helpers import DisableQuantization
from safetensors.torch import load_file, save_file

from conftest import as_dataset
from mone_modifier.tiny_moe import FAMILIES, NUM_EXPERTS

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"
# families whose experts are separate gate / up / down projections: the
# per-expert checkpoint-layout and quantized-reload tests name those tensors,
# so GPT-OSS (fused gate-up projections with biases) is not among them
PROJECTION_FAMILIES = [family for family in FAMILIES if family != "gpt_oss"]


def run_oneshot(
    model,
    samples: torch.Tensor,
    recipe,
    batch_size: int = 1,
    calibrate_all: bool = True,
    pipeline: str = "independent",
    **kwargs,
):
    return oneshot(
        model=str(model) if isinstance(model, Path) else model,
        dataset=as_dataset(samples),
        recipe=recipe,
        num_calibration_samples=len(samples),
        batch_size=batch_size,
        shuffle_calibration_samples=False,
        moe_calibrate_all_experts=calibrate_all,
        pipeline=pipeline,
        **kwargs,
    )


@torch.no_grad()
def fp8_rounded_logits(model, samples: torch.Tensor) -> torch.Tensor:
    """
    The logits a reload of an FP8 oneshot model gives: the same network with
    every quantized weight rounded to FP8 by compressed-tensors and no
    activation quantization (left to the engine). Call it before saving:
    saving compresses the model in place (and re-quantizing FP8-rounded
    weights with the same scales gives the same FP8 values). Weights are
    written through the offload cache, since on CUDA ``module.weight`` is an
    onloaded copy of the weight the forward reads.
    """
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and scheme.weights is not None:
            rounded = fake_quantize(
                module.weight,
                module.weight_scale,
                getattr(module, "weight_zero_point", None),
                scheme.weights,
            )
            update_offload_parameter(module, "weight", rounded)
    with DisableQuantization(model):
        return model(input_ids=samples).logits


def run_quick(script: str, out: Path, *args: str):
    """Run a benchmark script's quick mode, writing into ``out``; a failure
    shows the end of the script's stderr."""
    command = [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out)]
    result = subprocess.run(command + list(args), capture_output=True, text=True)
    assert result.returncode == 0, f"{script} --quick failed:\n{result.stderr[-3000:]}"


def read_report(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def novice_vectors(model, layer_index: int) -> dict[int, torch.Tensor]:
    experts = model.model.layers[layer_index].mlp.experts
    return {
        int(name.split(".")[0]): buffer
        for name, buffer in experts.named_buffers()
        if name.endswith("approx_value")
    }


def tree_digest(path: Path) -> str:
    """One hash of every file's name and bytes under ``path``."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file():
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


CHOICE_TASK = """task: mone_tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def choice_documents(samples: torch.Tensor) -> list[dict]:
    """Continue each held-out sequence with its true next four tokens or with
    three other four-token spans."""
    docs = []
    for i, row in enumerate(samples.tolist()):
        words = [f"w{t}" for t in row]
        spans = [words[12:16], words[16:20], words[4:8], words[20:24]]
        label = i % 4
        spans[0], spans[label] = spans[label], spans[0]
        docs.append(
            {
                "context": " ".join(words[:12]),
                "choices": [" " + " ".join(s) for s in spans],
                "label": label,
            }
        )
    return docs


def write_choice_task(directory: Path, samples: torch.Tensor) -> list[dict]:
    """A local lm-eval multiple-choice task ``mone_tiny_choice`` in
    ``directory`` (a YAML and its JSONL data); returns its documents."""
    docs = choice_documents(samples)
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / "tiny_choice.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs))
    (directory / "tiny_choice.yaml").write_text(CHOICE_TASK.format(data=data))
    return docs


def to_expert_substitution(source, out, novices: dict[int, list[int]]):
    """Rewrite an approximate_experts checkpoint in the expert_substitution
    layout: retained experts renumbered 0 .. R-1, constants named in the config."""
    tensors = load_file(source / "model.safetensors")
    rewritten = {}
    targets = {}
    for layer, ids in novices.items():
        layer = int(layer)
        # Mixtral's checkpoint names its block block_sparse_moe, others mlp
        (prefix,) = {
            match.group(1)
            for key in tensors
            if (match := re.match(rf"(model\.layers\.{layer}\.\w+\.experts)\.", key))
        }
        retained = [e for e in range(NUM_EXPERTS) if e not in ids]
        replacements = {}
        for key in [k for k in tensors if k.startswith(prefix + ".")]:
            expert, rest = key[len(prefix) + 1 :].split(".", 1)
            tensor = tensors.pop(key)
            if int(expert) in ids:
                name = f"{prefix}.substitutions.{expert}.value"
                rewritten[name] = tensor
                replacements[expert] = {
                    "format": "constant-v1",
                    "tensors": {"value": name},
                }
            else:
                rewritten[f"{prefix}.{retained.index(int(expert))}.{rest}"] = tensor
        targets[prefix] = {
            "weight_layout": "compact_retained_experts",
            "replacements": replacements,
        }
    out.mkdir()
    save_file(
        {**tensors, **rewritten}, out / "model.safetensors", metadata={"format": "pt"}
    )
    config = json.loads((source / "config.json").read_text())
    del config["approximate_experts"]
    config["compression_config"] = {
        "transform_config": {
            "expert_substitution": {
                "version": 1,
                "router_semantics": {
                    "preserve_logical_expert_ids": True,
                    "preserve_router_weights": True,
                    "renormalize_after_substitution": False,
                },
                "targets": targets,
            }
        }
    }
    (out / "config.json").write_text(json.dumps(config))
    for file in source.iterdir():  # tokenizer, generation config, recipe
        if not (out / file.name).exists():
            shutil.copy(file, out / file.name)
