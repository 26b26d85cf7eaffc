"""`LLM`: the offline API with vLLM's names and behaviour."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from tqdm.auto import tqdm

from kiln.runtime.config import EngineConfig
from kiln.runtime.engine import LLMEngine
from kiln.runtime import score_templates
from kiln.runtime.outputs import (ClassificationOutput, ClassificationRequestOutput, EmbeddingOutput,
                                  EmbeddingRequestOutput, PoolingRequestOutput, RequestOutput, ScoringOutput,
                                  ScoringRequestOutput)
from kiln.runtime.pooling_params import PoolingParams
from kiln.runtime.sampling_params import RequestOutputKind, SamplingParams


# An offline call's token budget per step on a GPU of 70 GiB or more, as vLLM's LLM class has it
# (its server, like kiln's engine, keeps 8192 for inter-token latency; a smaller GPU keeps it for
# the activations' memory): fewer, larger prefill steps, each reading the weights and running the
# decode rows once. 1000 requests of the Llama-3.2-1B shape on an H100: prompt steps at 4.7 us a
# token instead of 5.9, the whole run 5.7-6.0 s instead of 6.4-7.2.
OFFLINE_BATCHED_TOKENS = 16384


def _large_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory >= 70 << 30


class LLM:
    """Load a model and generate from it in batches.

        llm = LLM(model="path/to/checkpoint")
        outs = llm.generate(["Hello, my name is"], SamplingParams(max_tokens=32))
        outs[0].outputs[0].text
    """

    def __init__(self, model: str, tokenizer: str | None = None, *, dtype: Any = "auto", seed: int = 0,
                 max_model_len: int | None = None, max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 kv_cache_memory: int | None = None, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool | None = None, hf_overrides: dict | Callable | None = None,
                 trust_remote_code: bool = False, skip_tokenizer_init: bool = False, runner: str = "generate",
                 convert: str = "auto", pooler_config: Any = None, model_impl: str = "auto",
                 compilation_config: dict | None = None, data_parallel_size: int = 1, tensor_parallel_size: int = 1,
                 **kwargs: Any):
        self._ids = itertools.count()
        self._replicas = None
        self._tokenizer = None  # (data parallelism: replica 0's, once asked for)
        if data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {data_parallel_size}")
        if data_parallel_size > 1:  # replicas in their own processes; this object only routes
            from kiln.runtime.data_parallel import make_pool

            local = {k: v for k, v in locals().items() if k not in ("self", "kwargs", "data_parallel_size", "make_pool")}
            self._replicas = make_pool(data_parallel_size, {**local, **kwargs})
            self.llm_engine = None
            return
        if max_num_batched_tokens is None and kwargs.get("device", "auto") != "cpu" and _large_gpu():
            max_num_batched_tokens = OFFLINE_BATCHED_TOKENS
        self.llm_engine = LLMEngine(EngineConfig(
            model=model, tokenizer=tokenizer, dtype=dtype, seed=seed, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=kv_cache_memory,
            gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager, hf_overrides=hf_overrides,
            trust_remote_code=trust_remote_code, skip_tokenizer_init=skip_tokenizer_init, runner=runner,
            convert=convert, pooler_config=pooler_config, model_impl=model_impl,
            compilation_config=compilation_config, tensor_parallel_size=tensor_parallel_size, **kwargs))
        self.llm_engine.freeze_gc_heap()

    def get_tokenizer(self):
        if self._replicas is not None:  # replica 0's, sent over once
            if self._tokenizer is None:
                self._tokenizer = self._replicas.ask("get_tokenizer")
            return self._tokenizer
        return self.llm_engine.tokenizer

    def _on_replicas(self, method: str, prompts, params, **kwargs) -> list:
        """A call of `method` spread over the data-parallel replicas (by load), in order."""
        if not isinstance(prompts, (list, tuple)):
            prompts = [prompts]
        per_prompt = list(params) if isinstance(params, (list, tuple)) else None
        if per_prompt is None:
            kwargs["sampling_params" if method in ("generate", "chat") else "pooling_params"] = params
        if per_prompt is not None and len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(per_prompt)} params")
        loads = [float(_size(p)) + float(getattr(q, "max_tokens", 0) or 0)
                 for p, q in zip(prompts, per_prompt or [params] * len(prompts))]
        outs = self._replicas.call(method, list(prompts), per_prompt, loads, use_tqdm=False, **kwargs)
        for out in outs:  # ids unique across replicas
            out.request_id = str(next(self._ids))
        return outs

    def shutdown(self) -> None:
        """Stop the data-parallel replicas or the tensor-parallel workers (a single-process LLM has
        nothing to stop)."""
        if self._replicas is not None:
            self._replicas.shutdown()
        elif self.llm_engine is not None:
            self.llm_engine.shutdown()

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, {"prompt_token_ids": [...]}, or a list of either. One output per
        prompt, in order. Bad input raises before any request is queued."""
        if self._replicas is not None:
            return self._on_replicas("generate", prompts, sampling_params)
        if not isinstance(prompts, (list, tuple)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        engine = self.llm_engine
        if engine.is_pooling:
            raise ValueError(f"{engine.architecture} is loaded as a pooling model (runner='pooling'): use "
                             "embed/classify/score/reward/encode, or load it with runner='generate'")
        prompts = engine.prepare_prompts(prompts)  # validates everything before queueing anything
        # one output per request, when it finishes: as vLLM's LLM does (no per-step output objects)
        final = {id(p): p.clone(output_kind=RequestOutputKind.FINAL_ONLY) for p in params if isinstance(p, SamplingParams)}
        params = [final.get(id(p), p) for p in params]
        return self._run(engine.add_request, prompts, params, use_tqdm)

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """messages: one conversation ([{"role": ..., "content": ...}, ...]) or a list of them."""
        if self._replicas is not None:
            conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
            return self._on_replicas("chat", conversations, sampling_params, chat_template=chat_template,
                                     add_generation_prompt=add_generation_prompt,
                                     continue_final_message=continue_final_message,
                                     chat_template_kwargs=chat_template_kwargs)
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

    # ------------------------------------------------------------ pooling

    def encode(self, prompts, pooling_params: PoolingParams | Sequence[PoolingParams] | None = None,
               use_tqdm: bool = True, pooling_task: str | None = None,
               truncate_prompt_tokens: int | None = None) -> list[PoolingRequestOutput]:
        """The model's raw pooled output per prompt (`outputs.data`, a tensor): for token
        classification and reward models one row per token (or per step tag)."""
        if self._replicas is not None:
            return self._on_replicas("encode", prompts, pooling_params, pooling_task=pooling_task,
                                     truncate_prompt_tokens=truncate_prompt_tokens)
        return self._pool(prompts, pooling_params, pooling_task or "encode", use_tqdm, truncate_prompt_tokens)

    def embed(self, prompts, pooling_params=None, use_tqdm: bool = True,
              truncate_prompt_tokens: int | None = None) -> list[EmbeddingRequestOutput]:
        if self._replicas is not None:
            return self._on_replicas("embed", prompts, pooling_params,
                                     truncate_prompt_tokens=truncate_prompt_tokens)
        return self._pool(prompts, pooling_params, "embed", use_tqdm, truncate_prompt_tokens, _embeddings)

    def classify(self, prompts, pooling_params=None, use_tqdm: bool = True,
                 truncate_prompt_tokens: int | None = None) -> list[ClassificationRequestOutput]:
        if self._replicas is not None:
            return self._on_replicas("classify", prompts, pooling_params,
                                     truncate_prompt_tokens=truncate_prompt_tokens)
        return self._pool(prompts, pooling_params, "classify", use_tqdm, truncate_prompt_tokens, _classifications)

    def reward(self, prompts, pooling_params=None, use_tqdm: bool = True,
               truncate_prompt_tokens: int | None = None) -> list[PoolingRequestOutput]:
        if self._replicas is not None:
            return self._on_replicas("reward", prompts, pooling_params,
                                     truncate_prompt_tokens=truncate_prompt_tokens)
        return self._pool(prompts, pooling_params, "reward", use_tqdm, truncate_prompt_tokens)

    def score(self, data_1, data_2, truncate_prompt_tokens: int | None = None, use_tqdm: bool = True,
              pooling_params: PoolingParams | None = None, chat_template: str | None = None) -> list[ScoringRequestOutput]:
        """Relevance of each (data_1, data_2) pair: one text against many (1:N) or pairwise (N:N).
        Cross-encoders and rerankers score the pair as one input (the tokenizer's sentence-pair
        encoding, or a score template); embedding models give the cosine of the two embeddings."""
        first, second = _score_pairs(data_1, data_2)
        if self._replicas is not None:  # the pairs spread over the replicas, each scoring its share
            loads = [float(_size(a) + _size(b)) for a, b in zip(first, second)]
            outs = self._replicas.call("score", first, second, loads, truncate_prompt_tokens=truncate_prompt_tokens,
                                       use_tqdm=False, pooling_params=pooling_params, chat_template=chat_template)
            for i, out in enumerate(outs):
                out.request_id = str(i)
            return outs
        engine = self.llm_engine
        if "classify" in engine.tasks:
            return self._cross_encode(first, second, truncate_prompt_tokens, use_tqdm, pooling_params, chat_template)
        if "embed" not in engine.tasks:
            raise ValueError(f"{engine.architecture} serves {'/'.join(engine.tasks)}: score needs an embedding or "
                             "a cross-encoder model")
        embeddings = self._pool(first + second, pooling_params, "embed", use_tqdm, truncate_prompt_tokens)
        n = len(first)
        data = [o.outputs.data for o in embeddings]
        if all(d.shape == data[0].shape for d in data):  # every pair in one call
            cosines = torch.nn.functional.cosine_similarity(torch.stack(data[:n]), torch.stack(data[n:]), dim=-1).tolist()
        else:
            cosines = [float(torch.nn.functional.cosine_similarity(a, b, dim=-1)) for a, b in zip(data[:n], data[n:])]
        return [ScoringRequestOutput(str(i), ScoringOutput(cosine), a.prompt_token_ids + b.prompt_token_ids)
                for i, (cosine, a, b) in enumerate(zip(cosines, embeddings[:n], embeddings[n:]))]

    def _cross_encode(self, first, second, truncate, use_tqdm, pooling_params, chat_template):
        prompts = score_templates.cross_encoder_prompts(self.llm_engine, first, second, truncate, chat_template)
        return self._pool(prompts, pooling_params, "score", use_tqdm, None, _cross_encoder_scores)

    def _pool(self, prompts, pooling_params, task: str, use_tqdm: bool, truncate: int | None,
              convert: Callable[[list], list] | None = None) -> list:
        engine = self.llm_engine
        if not engine.is_pooling:
            raise ValueError(f"{engine.architecture} is loaded for generation; pass runner='pooling' (and convert=...) "
                             f"to {task} with it")
        if not isinstance(prompts, (list, tuple)):
            prompts = [prompts]
        if pooling_params is None:
            pooling_params = PoolingParams()
        params = [pooling_params] * len(prompts) if isinstance(pooling_params, PoolingParams) else list(pooling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} pooling params")
        # each distinct PoolingParams cloned once (the usual call shares one between all prompts)
        clones: dict[int, PoolingParams] = {}
        changes = {"task": task} | ({"truncate_prompt_tokens": truncate} if truncate is not None else {})
        for p in params:
            if id(p) not in clones:
                clones[id(p)] = p.clone(**changes)
        params = [clones[id(p)] for p in params]
        if task not in engine.tasks and task != "encode":
            raise ValueError(f"{engine.architecture} serves {'/'.join(engine.tasks)}, not {task!r}"
                             + (" (load it with convert='classify' or 'embed')" if task in ("embed", "classify") else ""))
        for p in params:
            if p.dimensions is not None and task != "embed":
                raise ValueError("PoolingParams.dimensions applies to embeddings only")

        def prepare(chunk: list, chunk_params: list) -> list:
            return engine.prepare_prompts(chunk, pooling=True, truncates=[p.truncate_prompt_tokens for p in chunk_params])

        return self._run(engine.add_pooling_request, prompts, params, use_tqdm, convert, prepare)

    # ------------------------------------------------------------ transcription

    def transcribe(self, audio, language: str | None = None, task: str = "transcribe", timestamps: bool = False,
                   sample_rate: int | None = None, sampling_params: SamplingParams | None = None,
                   use_tqdm: bool = True):
        """Speech to text with a Whisper-style model. `audio`: a path, bytes, a file object or an
        array (with `sample_rate`), or a list of these (then a list of outputs). Audio longer than
        30 s is cut into 30-second windows, transcribed as one batch, and the texts joined.
        `language` None detects it from the first window; `task` "translate" translates to English."""
        from kiln.runtime import audio as audio_io
        from kiln.runtime import transcription as tr

        if self._replicas is not None:
            # decoded here (bad audio fails before any replica works), the clips spread by duration
            single = not isinstance(audio, list)
            samples = [audio_io.load_audio(a, sample_rate) for a in ([audio] if single else audio)]
            results = self._replicas.call(
                "transcribe", samples, None, [float(len(x)) for x in samples], language=language, task=task,
                timestamps=timestamps, sample_rate=audio_io.SAMPLE_RATE, sampling_params=sampling_params,
                use_tqdm=False)
            return results[0] if single else results
        engine, tokenizer = self.llm_engine, self.llm_engine.tokenizer
        if not engine.is_encoder_decoder:
            raise ValueError(f"{engine.architecture} is not a speech-to-text model")
        if tokenizer is None:
            raise ValueError("transcribe needs the tokenizer (skip_tokenizer_init=True was given)")
        single = not isinstance(audio, list)
        samples = [audio_io.load_audio(a, sample_rate) for a in ([audio] if single else audio)]
        features = [tr.features_of(engine.feature_extractor, x) for x in samples]
        if language is None:
            detect = [tr.detection_request(tokenizer, f[0]) for f in features]
            outs = self.generate([p for p, _ in detect], [q for _, q in detect], use_tqdm=False)
            langs = [tr.languages(tokenizer)[o.outputs[0].token_ids[0]] for o in outs]
        else:
            langs = [language] * len(samples)
        prompts, owners = [], []
        for i, (f, lang) in enumerate(zip(features, langs)):
            window = tr.window_prompts(tokenizer, f, lang, task, timestamps)
            prompts += window
            owners += [i] * len(window)
        params = sampling_params or SamplingParams(temperature=0.0, max_tokens=None, skip_special_tokens=True)
        outs = self.generate(prompts, params, use_tqdm=use_tqdm)
        results = [tr.assemble(tokenizer, [o.outputs[0].token_ids for o, who in zip(outs, owners) if who == i],
                               langs[i], audio_io.duration(x), timestamps) for i, x in enumerate(samples)]
        return results[0] if single else results

    def apply_model(self, func: Callable) -> list:
        """Call func(model) on each worker's model and return the results (with data parallelism,
        func must pickle: a module-level function, not a lambda)."""
        if self._replicas is not None:
            return self._replicas.apply(func)
        return [func(self.llm_engine.model)]

    def _run(self, add, prompts: list, params: list, use_tqdm: bool, convert: Callable[[list], list] | None = None,
             prepare: Callable[[list, list], list] | None = None) -> list:
        """Queue the prompts with `add(request_id, prompt, params)`, step the engine until all are
        done, return their outputs in order (each step's finished ones passed through `convert`,
        when given, as they come). On any error, nothing stays queued.

        Without `prepare` the prompts come validated. With it (pooling calls, whose steps are short
        and whose host work is mostly tokenizing), `prepare(prompts, params)` tokenizes and
        validates them in chunks (`_prepared_chunks`), each queued when ready: the device runs the
        first steps while the host prepares the rest. A bad prompt then raises after earlier chunks
        have run; their requests are aborted, and the call returns nothing, as when it raises first."""
        engine = self.llm_engine
        ids = [str(next(self._ids)) for _ in prompts]
        chunks = _prepared_chunks(prompts, params, prepare)
        try:
            pending, done, queued = set(ids), {}, 0
            with contextlib.closing(chunks), tqdm(total=len(ids), desc="Processed prompts", unit="req",
                                                  disable=not use_tqdm) as bar:
                while pending:
                    if queued < len(ids):  # the next chunk, queued before this step launches
                        ready = next(chunks)
                        for rid, prompt, p in zip(ids[queued:], ready, params[queued:]):
                            add(rid, prompt, p)
                        queued += len(ready)
                    if not engine.has_unfinished_requests():
                        raise RuntimeError(f"requests {sorted(pending)} were dropped by the engine")
                    finished = [out for out in engine.step(more_coming=queued < len(ids))
                                if out.finished and out.request_id in pending]
                    for out in convert(finished) if convert is not None and finished else finished:
                        done[out.request_id] = out
                        pending.discard(out.request_id)
                    if finished:
                        bar.update(len(finished))
            return [done[rid] for rid in ids]
        except BaseException:
            engine.abort_request([rid for rid in ids if rid in engine.parents])
            raise


# prompts a pooling call tokenizes and queues at a time (about 20k tokens of 4-96-word sentences:
# a step of BERT-base is a few ms on an H100)
PREPARE_CHUNK = 256


def _prepared_chunks(prompts: list, params: list, prepare: Callable[[list, list], list] | None):
    """The prompts in the order given, as chunks ready to queue: all at once without `prepare`;
    with it, `prepare(chunk, chunk_params)` of PREPARE_CHUNK at a time, each next chunk prepared on
    a worker thread while the caller queues and steps the last (the tokenizer's Rust code releases
    the GIL: an H100 host tokenized 2048 sentences in about 50 ms, half an `embed` call)."""
    if prepare is None:
        yield prompts
        return
    size = PREPARE_CHUNK
    if len(prompts) <= size:
        yield prepare(prompts, params)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="kiln-prepare") as pool:
        future = pool.submit(prepare, prompts[:size], params[:size])
        for start in range(size, len(prompts) + size, size):
            ready = future.result()
            if start < len(prompts):
                future = pool.submit(prepare, prompts[start:start + size], params[start:start + size])
            yield ready


# Pooling outputs -> the task's vLLM output objects; `_run` converts each step's outputs as they
# come, while the device runs the next step.


def _embeddings(outs: list[PoolingRequestOutput]) -> list[EmbeddingRequestOutput]:
    # (the list of floats is made when `embedding` is first read: see EmbeddingOutput)
    return [EmbeddingRequestOutput(o.request_id, EmbeddingOutput(data=o.outputs.data), o.prompt_token_ids)
            for o in outs]


def _classifications(outs: list[PoolingRequestOutput]) -> list[ClassificationRequestOutput]:
    return [ClassificationRequestOutput(o.request_id, ClassificationOutput(data), o.prompt_token_ids)
            for o, data in zip(outs, _tolists([o.outputs.data for o in outs]))]


def _cross_encoder_scores(outs: list[PoolingRequestOutput]) -> list[ScoringRequestOutput]:
    scores = _tolists([o.outputs.data.reshape(-1)[:1] for o in outs])
    return [ScoringRequestOutput(o.request_id, ScoringOutput(score[0]), o.prompt_token_ids)
            for o, score in zip(outs, scores)]


def _tolists(tensors: list[torch.Tensor]) -> list[list]:
    """Each tensor's `tolist()`; tensors of one shape (a step's embeddings, say) in one call."""
    if tensors and all(t.shape == tensors[0].shape for t in tensors):
        return torch.stack(tensors).tolist()
    return [t.tolist() for t in tensors]


def _score_pairs(data_1, data_2) -> tuple[list[str], list[str]]:
    """score's two sides as lists of the same length (one text against many repeated)."""
    first = [data_1] if isinstance(data_1, str) else list(data_1)
    second = [data_2] if isinstance(data_2, str) else list(data_2)
    if not first or not second:
        raise ValueError("score needs at least one text on each side")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise ValueError(f"score: data_1 has {len(first)} texts and data_2 {len(second)}; "
                         "give one text against many, or two lists of the same length")
    if not all(isinstance(t, str) for t in first + second):
        raise ValueError("score takes strings")
    return first, second


def _size(prompt) -> int:
    """A prompt's rough token count, for balancing replicas."""
    if isinstance(prompt, str):
        return len(prompt) // 4 + 1
    if isinstance(prompt, dict):
        return len(prompt.get("prompt_token_ids") or []) or len(str(prompt.get("prompt", ""))) // 4 + 1
    return len(prompt) if isinstance(prompt, list) else 1
