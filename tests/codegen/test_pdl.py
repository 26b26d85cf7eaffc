"""Programmatic dependent launch (codegen/kernels/pdl.py).

On the CPU (the interpreter has no griddepcontrol) the launchers must not ask for it. On a Hopper
GPU, a decode-layer-shaped chain of kiln kernels, each reading what the one before wrote, run
with PDL (eagerly and replayed from a CUDA graph) must give exactly what serial launches give: a
kernel that read its input before its wait would read the previous replay's or garbage. (Inside
the graph the decode attention loads its older keys and values before its wait: this step's,
poisoned before each replay, must still be read after it.)
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kiln.codegen.kernels import pdl  # noqa: E402
from kiln.codegen.kernels.activation import silu_and_mul  # noqa: E402
from kiln.codegen.kernels.decode_attention import decode_attention  # noqa: E402
from kiln.codegen.kernels.norm import add_rms_norm  # noqa: E402
from kiln.codegen.kernels.quant_gemm import float_linear  # noqa: E402
from kiln.codegen.kernels.rotary import rotary_kv_cache  # noqa: E402


def test_no_pdl_off_hopper_or_when_disabled(device):
    """The interpreter and the CPU never get PDL; set_enabled(False) turns it off everywhere."""
    if device.type == "cpu":
        assert pdl.launch_args(device) == {"PDL": False, "launch_pdl": False}
    try:
        pdl.set_enabled(False)
        assert not pdl.use_pdl(device)
        assert pdl.launch_args(device) == {"PDL": False, "launch_pdl": False}
    finally:
        pdl.set_enabled(True)
    if device.type == "cuda":
        assert pdl.use_pdl(device) == (torch.cuda.get_device_capability(device)[0] >= 9)


def _layers(E=2048, F=4096, H=16, HKV=4, D=64, layers=6, ctx=300, block_size=16, device="cuda"):
    """Random weights and a paged cache for a small decoder, and one decode step through it built
    from kiln's kernels only: add_rms_norm, gemv (qkv), rotary + cache write, decode attention,
    gemv (o), add_rms_norm, gemv (gate_up), silu_and_mul, gemv (down)."""
    dt = torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)

    def w(*shape, scale=0.02):
        return (torch.randn(*shape, generator=g) * scale).to(device, dt)

    params = [dict(n1=1 + w(E, scale=0.1), qkv=w((H + 2 * HKV) * D, E), o=w(E, H * D), n2=1 + w(E, scale=0.1),
                   gate_up=w(2 * F, E), down=w(E, F)) for _ in range(layers)]
    blocks = -(-ctx // block_size)
    caches = [(torch.randn(blocks, block_size, HKV, D, generator=g).to(device, dt),
               torch.randn(blocks, block_size, HKV, D, generator=g).to(device, dt)) for _ in range(layers)]
    tables = torch.arange(blocks, dtype=torch.int32, device=device)[None]
    seq_lens = torch.tensor([ctx], dtype=torch.int32, device=device)
    positions = torch.tensor([ctx - 1], dtype=torch.int64, device=device)
    slots = torch.tensor([ctx - 1], dtype=torch.int64, device=device)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    angles = torch.arange(ctx, dtype=torch.float32)[:, None] * inv[None]
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(device)
    x = w(1, E, scale=1.0)

    def step():
        h, res = x, torch.zeros_like(x)
        for p, (kc, vc) in zip(params, caches):
            normed, res = add_rms_norm(h, res, p["n1"], 1e-5)
            q, k, v = float_linear(normed, p["qkv"]).split([H * D, HKV * D, HKV * D], dim=-1)
            q, _ = rotary_kv_cache(q.view(1, H, D), k.view(1, HKV, D), v.view(1, HKV, D), positions, cos_sin, True,
                                   kc, vc, slots)
            attn = decode_attention(q, kc, vc, tables, seq_lens, D ** -0.5)
            h = float_linear(attn.view(1, H * D), p["o"])
            normed, res = add_rms_norm(h, res, p["n2"], 1e-5)
            h = float_linear(silu_and_mul(float_linear(normed, p["gate_up"])), p["down"])
        return h + res

    step.caches, step.newest = caches, divmod(ctx - 1, block_size)  # (this step's token: block, offset)
    return step


def test_pdl_chain_matches_serial_launches(device):
    if device.type != "cuda" or not pdl.use_pdl(device):
        pytest.skip("PDL needs a CUDA device of compute capability 9.0 or later")
    step = _layers(device=device)
    try:
        pdl.set_enabled(False)
        serial = step().clone()
        assert torch.equal(step(), serial)  # (deterministic: the cache write rewrites the same slot)
        pdl.set_enabled(True)
        for _ in range(3):
            assert torch.equal(step(), serial)
        step()  # compile every PDL kernel before the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        block, offset = step.newest
        for _ in range(20):
            out.fill_(float("nan"))
            for kc, vc in step.caches:  # (the replay writes this step's k and v again: an attention
                kc[block, offset] = vc[block, offset] = float("nan")  # reading them early reads nan)
            graph.replay()
            assert torch.equal(out, serial)
    finally:
        pdl.set_enabled(True)
