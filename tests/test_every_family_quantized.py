"""
Every MoE family transformers ships (``family_walk.py``), pruned and
quantized by the README's recipes ``mone_w4.yaml`` (GPTQ W4A16) and
``mone_fp8.yaml``, saved compressed and reloaded through
``mone_modifier.from_pretrained``. A file of its own so that pytest-xdist
runs it beside the unquantized walk.
"""

import pytest

from family_walk import check_path, params


@pytest.mark.parametrize("family,path", params(["w4a16", "fp8"]))
def test_family_quantized(family, path, family_model, tmp_path, monkeypatch):
    check_path(family, path, family_model(family), tmp_path, monkeypatch)
