"""The decode graph's first kernel (codegen/kernels/decode_inputs.py) against its torch form
(`runtime/cuda_graphs.unpack_reference`): the staged step unpacked into the forward's inputs, ids
taken from the last argmax by index."""

import pytest
import torch

triton = pytest.importorskip("triton")

from kiln.codegen.kernels.decode_inputs import unpack_decode_inputs  # noqa: E402
from kiln.runtime.cuda_graphs import FIELDS, META, unpack_reference  # noqa: E402


@pytest.mark.parametrize("rows, b, width", [(9, 1, 1), (9, 8, 3), (33, 32, 300), (5, 4, 0)])
def test_unpack_matches_its_torch_form(rows, b, width, device):
    """Random staged steps (the runtime's layout, `rows` entries a field), about half the rows'
    ids from the last argmax; entries past b rows and past the width stay as they were."""
    at = (0, rows, 3 * rows, 5 * rows, FIELDS * rows, FIELDS * rows + META)
    staging = torch.randint(-5, 1000, (at[-1] + rows * width + 7,), dtype=torch.long)
    staging[at[3]:at[3] + rows] = torch.where(torch.rand(rows) < 0.5, torch.randint(0, rows, (rows,)), -1)
    staging[at[4]] = width
    staging = staging.to(device)
    last = torch.randint(0, 50000, (rows,), dtype=torch.long, device=device)
    outs = []
    for unpack in (unpack_decode_inputs, unpack_reference):
        ids, positions = (torch.full((rows,), -7, dtype=torch.long, device=device) for _ in range(2))
        seq_lens = torch.full((rows,), -7, dtype=torch.int32, device=device)
        tables = torch.full((rows, width + 2), -7, dtype=torch.long, device=device)
        unpack(staging, at, b, last, ids, positions, seq_lens, tables)
        outs.append((ids, positions, seq_lens, tables))
    for got, want in zip(*outs):
        assert torch.equal(got, want)
    ids, positions, seq_lens, tables = (t.cpu() for t in outs[0])
    staging, last = staging.cpu(), last.cpu()
    src = staging[at[3]:at[3] + b]
    assert torch.equal(ids[:b], torch.where(src >= 0, last[src.clamp(min=0)], staging[:b]))
    assert torch.equal(seq_lens[:b], staging[at[2]:at[2] + b].to(torch.int32))
    assert torch.equal(tables[:b, :width].flatten(), staging[at[5]:at[5] + b * width])
    assert (ids[b:] == -7).all() and (tables[b:] == -7).all() and (tables[:, width:] == -7).all()
