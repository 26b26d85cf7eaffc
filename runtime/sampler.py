"""The sampler: from a batch of logits to one token per request, vectorised over the batch.

Order (as vLLM): min_tokens masking, repetition/frequency/presence penalties, then greedy rows take
the argmax; the others are divided by their temperature, filtered by min_p, top_k and top_p, and
sampled. Sampling is an exponential race (argmax of p / q, q ~ Exp(1)), which lets seeded rows
draw their noise from their own generator while the rest share one draw.
Logprobs are the model's raw log-softmax (before penalties and temperature), as vLLM returns them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kiln.runtime.request import Request


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float] | None  # raw logprob of each sampled token, when any request asked
    ranks: list[int] | None
    topk: list[list[tuple[int, float]]] | None  # per row, the params.logprobs most likely (id, logprob)


def apply_penalties(logits: torch.Tensor, prompt_ids: list[list[int]], output_ids: list[list[int]],
                    repetition: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """logits [B, V]; penalties [B]. Repetition (HF/vLLM: divide positive logits, multiply negative
    ones) counts prompt and output tokens; frequency and presence count output tokens only."""
    B, V = logits.shape
    out_counts = _token_counts(output_ids, B, V, logits.device)
    seen = (_token_counts(prompt_ids, B, V, logits.device) + out_counts) > 0
    rep = repetition[:, None].expand(B, V)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    logits = logits - frequency[:, None] * out_counts
    return logits - presence[:, None] * (out_counts > 0).float()


def _token_counts(ids: list[list[int]], B: int, V: int, device) -> torch.Tensor:
    width = max((len(x) for x in ids), default=0)
    padded = torch.full((B, width + 1), V, dtype=torch.long)  # V: a padding bin dropped below
    for i, x in enumerate(ids):
        padded[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    counts = torch.zeros(B, V + 1, device=device)
    counts.scatter_add_(1, padded.to(device), torch.ones_like(padded, dtype=torch.float, device=device))
    return counts[:, :V]


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                            min_p: torch.Tensor) -> torch.Tensor:
    """Set filtered-out logits to -inf. top_k [B] long (0 = off), top_p [B] in (0, 1], min_p [B]."""
    if bool((min_p > 0).any()):
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    V = logits.shape[-1]
    ranks = torch.arange(V, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k, V)[:, None]
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    mass_before = probs.cumsum(-1) - probs  # keep a token while the mass above it is < top_p
    drop |= (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    drop[:, 0] = False  # the most likely token always survives
    return logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))


@functools.cache
def _triton_argmax():
    """kiln's two-launch argmax (codegen/kernels/sampling.py), or None without triton."""
    try:
        from kiln.codegen.kernels.sampling import argmax
    except ImportError:
        return None
    return argmax


def greedy_tokens(logits: torch.Tensor, out: torch.Tensor | None = None,
                  out_row: torch.Tensor | None = None) -> torch.Tensor:
    """argmax over the vocabulary, [B, V] -> [B] int64 (written into `out` when given; with
    `out_row`, a one-element int64 tensor, into out[out_row] of an [R, B] `out`, the row read on
    the device). On CUDA, kiln's two-launch Triton kernel: torch's reduces a 128K row with one
    thread block."""
    if logits.is_cuda and logits.dim() == 2 and logits.shape[-1] > 0 and _triton_argmax() is not None:
        return _triton_argmax()(logits, out, out_row)
    if out is None:
        return logits.argmax(-1)
    if out_row is not None:
        return out.index_copy_(0, out_row.view(1), logits.argmax(-1)[None])
    return out.copy_(logits.argmax(-1))


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[Request],
                 greedy: torch.Tensor | None = None) -> SamplerOutput:
        """logits [B, V] float32, one row per request; `greedy`: their argmax, when already
        computed (see `tokens`)."""
        want_logprobs = any(r.logprobs is not None for r in requests)
        raw_logprobs = logits.log_softmax(-1) if want_logprobs else None
        tokens = self.tokens(logits, requests, greedy)
        token_list = tokens.tolist()
        if raw_logprobs is None:
            return SamplerOutput(token_list, None, None, None)
        chosen = raw_logprobs.gather(1, tokens[:, None])
        ranks = (raw_logprobs > chosen).sum(-1) + 1
        max_k = max((r.params.logprobs or 0) for r in requests)
        topk = [[] for _ in requests]
        if max_k > 0:
            values, ids = raw_logprobs.topk(max_k, dim=-1)
            for i, r in enumerate(requests):
                k = r.params.logprobs or 0
                topk[i] = list(zip(ids[i, :k].tolist(), values[i, :k].tolist()))
        return SamplerOutput(token_list, chosen[:, 0].tolist(), ranks.tolist(), topk)

    def tokens(self, logits: torch.Tensor, requests: list[Request],
               greedy: torch.Tensor | None = None) -> torch.Tensor:
        """The sampled token of each row, [B] int64 on the logits' device, not read back (async
        scheduling feeds it to the next step on the device). `greedy`: the argmax of `logits`
        when already computed (a decode CUDA graph's), used unless this batch edits the logits."""
        B, V = logits.shape
        device = logits.device
        params = [r.params for r in requests]

        # a plain batch (the common decode step) needs no edited copy of the logits, and no device
        # tensor built from host lists: each such copy waits for the forward to finish
        edits = any(p.allowed_token_ids is not None or p.repetition_penalty != 1.0 or p.frequency_penalty
                    or p.presence_penalty for p in params) or any(
            len(r.output_token_ids) < r.params.min_tokens for r in requests)
        if edits:
            logits = logits.clone()
        for i, p in enumerate(params):
            if p.allowed_token_ids is not None:
                allowed = torch.full((V,), float("-inf"), device=device)
                allowed[p.allowed_token_ids] = 0.0
                logits[i] += allowed
        for i, r in enumerate(requests):  # min_tokens: no stopping token before then
            if len(r.output_token_ids) < r.params.min_tokens:
                stops = set(r.params.stop_token_ids) | (set() if r.params.ignore_eos else set(r.params._eos_token_ids))
                if stops:
                    logits[i, [t for t in stops if t < V]] = float("-inf")

        if any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in params):
            logits = apply_penalties(
                logits, [r.prompt_token_ids for r in requests], [r.output_token_ids for r in requests],
                torch.tensor([p.repetition_penalty for p in params], device=device),
                torch.tensor([p.frequency_penalty for p in params], device=device),
                torch.tensor([p.presence_penalty for p in params], device=device))

        tokens = greedy if greedy is not None and not edits else greedy_tokens(logits)
        if not all(p.greedy for p in params):
            greedy = torch.tensor([p.greedy for p in params], device=device)
            temperature = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)
            scaled = apply_top_k_top_p_min_p(
                logits / temperature[:, None],
                torch.tensor([p.top_k for p in params], device=device),
                torch.tensor([p.top_p for p in params], device=device),
                torch.tensor([p.min_p for p in params], device=device))
            probs = scaled.softmax(-1)
            noise = torch.empty_like(probs).exponential_()
            for i, r in enumerate(requests):
                if r.generator is not None and not params[i].greedy:
                    noise[i] = torch.empty(V).exponential_(generator=r.generator).to(device)
            tokens = torch.where(greedy, tokens, (probs / noise).argmax(-1))
        return tokens
