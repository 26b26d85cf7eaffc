"""BLOOM's ALiBi slopes against transformers' own, for head counts that are and are not powers of
two (the parity test runs a six-head BLOOM end to end)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from kiln.models.bloom import alibi_slopes


@pytest.mark.parametrize("heads", [1, 2, 3, 5, 6, 8, 12, 16, 20, 112])
def test_alibi_slopes_match_transformers(heads):
    torch.testing.assert_close(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")), rtol=1e-6, atol=0)
