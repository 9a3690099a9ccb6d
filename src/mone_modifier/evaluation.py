"""
Evaluating MoNE checkpoints with lm-eval (optional: ``pip install
mone-modifier[eval]``).

Importing this module registers the lm-eval model ``mone``: lm-eval's
Hugging Face model (``HFLM``) around ``mone_modifier.from_pretrained``.

    import mone_modifier.evaluation, lm_eval
    lm_eval.simple_evaluate(model="mone", model_args="pretrained=out", tasks=[...])

lm-eval's command line cannot import plugins, so this module runs it with
the model registered:

    python -m mone_modifier.evaluation --model mone --model_args pretrained=out \\
        --tasks arc_easy
"""

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import AutoTokenizer

from mone_transformers import from_pretrained

__all__ = ["MoNELM"]


@register_model("mone")
class MoNELM(HFLM):
    """
    :param pretrained: MoNE checkpoint directory (also read for the tokenizer
        unless ``tokenizer`` is given)
    :param dtype: dtype to load the weights in (default: as stored)
    :param kwargs: lm-eval's HFLM options (batch_size, device, max_length, ...)
    """

    def __init__(
        self,
        pretrained: str,
        dtype: str | torch.dtype | None = None,
        tokenizer: str | None = None,
        device: str = "cpu",
        **kwargs,
    ):
        if isinstance(dtype, str) and dtype != "auto":
            dtype = getattr(torch, dtype)
        model = from_pretrained(pretrained, dtype=None if dtype == "auto" else dtype)
        # AutoTokenizer reads config.json too, which transformers cannot parse
        # for the MoNE authors' own model types: give it the loaded one
        tokenizer = AutoTokenizer.from_pretrained(
            tokenizer or pretrained, config=model.config
        )
        super().__init__(
            pretrained=model.to(device),
            tokenizer=tokenizer,
            device=device,
            **kwargs,
        )


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
