"""`LLM`: the offline API with vLLM's names and behaviour."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from kiln.runtime.config import EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime.outputs import RequestOutput
from kiln.runtime.sampling_params import SamplingParams


class LLM:
    """Load a model and generate from it in batches.

        llm = LLM(model="path/to/checkpoint")
        outs = llm.generate(["Hello, my name is"], SamplingParams(max_tokens=32))
        outs[0].outputs[0].text
    """

    def __init__(self, model: str, tokenizer: str | None = None, *, dtype: Any = "auto", seed: int = 0,
                 max_model_len: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 kv_cache_memory: int | None = None, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, hf_overrides: dict | Callable | None = None,
                 trust_remote_code: bool = False, skip_tokenizer_init: bool = False, runner: str = "generate",
                 **kwargs: Any):
        self.llm_engine = LLMEngine(EngineConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, seed=seed, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, hf_overrides=hf_overrides,
            trust_remote_code=trust_remote_code, skip_tokenizer_init=skip_tokenizer_init, runner=runner, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, {"prompt_token_ids": [...]}, or a list of either. One output per
        prompt, in order. Bad input raises before any request is queued."""
        if not isinstance(prompts, (list, tuple)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        engine = self.llm_engine
        for prompt in prompts:  # validate everything before queueing anything
            engine.tokenize(prompt)
        ids = [str(next(self._ids)) for _ in prompts]
        try:
            for rid, prompt, p in zip(ids, prompts, params):
                engine.add_request(rid, prompt, p)
            return self._run(ids, use_tqdm)
        except BaseException:
            engine.abort_request([rid for rid in ids if rid in engine.parents])
            raise

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """messages: one conversation ([{"role": ..., "content": ...}, ...]) or a list of them."""
        tokenizer = self.llm_engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer (skip_tokenizer_init=True was given)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        template = chat_template or tokenizer.chat_template
        if template is None:
            raise ValueError("the tokenizer has no chat template; pass chat_template=")
        prompts = []
        for conv in conversations:
            ids = tokenizer.apply_chat_template(
                conv, chat_template=template, tokenize=True, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, return_dict=False, **(chat_template_kwargs or {}))
            prompts.append({"prompt_token_ids": list(ids)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_model(self, func: Callable) -> list:
        """Call func(model) on each worker's model (one worker today) and return the results."""
        return [func(self.llm_engine.model)]

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine, pending, done = self.llm_engine, set(ids), {}
        with tqdm(total=len(ids), desc="Processed prompts", unit="req", disable=not use_tqdm) as bar:
            while pending:
                if not engine.has_unfinished_requests():
                    raise RuntimeError(f"requests {sorted(pending)} were dropped by the engine")
                for out in engine.step():
                    if out.finished and out.request_id in pending:
                        done[out.request_id] = out
                        pending.discard(out.request_id)
                        bar.update(1)
        return [done[rid] for rid in ids]
