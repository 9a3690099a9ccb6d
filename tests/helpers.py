"""Running oneshot on the tiny models the way a user would."""

import hashlib
import json
from pathlib import Path

import torch
from llmcompressor import oneshot

from conftest import as_dataset


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
