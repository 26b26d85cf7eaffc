"""LLMEngine: requests in, one scheduler step at a time, RequestOutputs out."""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import itertools
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
import torch

from kiln.frontend import load_hf_config, load_model, resolve_dtype, resolve_model_path
from kiln.frontend.loader import read_kv_scales
from kiln.frontend.config import sentence_transformers_pooling
from kiln.frontend.quantization import checkpoint_quantization, quantize_weights
from kiln.frontend.trace import graphs_compiled
from kiln.models import resolve_architecture
from kiln.runtime.block_manager import BlockManager
from kiln.runtime.config import EngineConfig
from kiln.runtime.detokenizer import FinalDetokenizer, IncrementalDetokenizer, find_stop, make_detokenizer
from kiln.runtime.model_runner import ModelRunner, PendingTokens, kv_cache_layers
from kiln.runtime.outputs import CompletionOutput, Logprob, PoolingOutput, PoolingRequestOutput, RequestOutput
from kiln.runtime.pooler import PooledStep, pool_step
from kiln.runtime.pooling_params import PoolerConfig, PoolingParams
from kiln.runtime.request import Request, RequestStatus
from kiln.runtime.sampler import Sampler, SamplerOutput
from kiln.runtime.sampling_params import RequestOutputKind, SamplingParams
from kiln.runtime.scheduler import CrossSlots, PoolingScheduler, Scheduler
from kiln.runtime.state_slots import StateSlots

logger = logging.getLogger("kiln")

_DEFAULT_CPU_KV_CACHE_MEMORY = 1 << 30


def freeze_gc_heap() -> None:
    """Move every object alive now (the libraries, the model, the engine) out of the garbage
    collector's reach, as vLLM does after startup: a full collection otherwise walks the several
    hundred thousand objects torch and transformers leave tracked, a pause of 0.1-0.4 s that the
    few objects per request of a large batch trigger every few calls. Garbage is collected first,
    so nothing unreachable is kept; what is frozen is still freed by reference counting."""
    global _gc_unfreeze_at_exit
    gc.collect()
    gc.freeze()
    if not _gc_unfreeze_at_exit:  # so that the interpreter's last collection still sees them
        atexit.register(gc.unfreeze)
        _gc_unfreeze_at_exit = True


_gc_unfreeze_at_exit = False


def uncached_bytecode_note(dont_write_bytecode: bool | None = None, module_file: str | None = None) -> str | None:
    """Why a start may be slow before kiln does anything: Python neither reads nor writes bytecode
    for torch (PYTHONDONTWRITEBYTECODE set and none shipped, as in images built that way), so every
    process compiles the ~4500 modules torch, transformers and torch.compile import: 11-13 s of a
    warm start on the lent H100 machines (benchmarks/RESULTS.md, the cold start)."""
    import importlib.util

    dont_write_bytecode = sys.flags.dont_write_bytecode if dont_write_bytecode is None else dont_write_bytecode
    module_file = module_file or torch.__file__
    if not dont_write_bytecode or os.path.exists(importlib.util.cache_from_source(module_file)):
        return None
    return ("Python writes no bytecode here (PYTHONDONTWRITEBYTECODE) and torch has none cached, so each start "
            "compiles every module it imports (seconds); compile site-packages once (python -m compileall) "
            "or point PYTHONPYCACHEPREFIX at a writable folder with PYTHONDONTWRITEBYTECODE unset")


@functools.cache
def _log_uncached_bytecode() -> None:
    """`uncached_bytecode_note`, logged once a process."""
    if (note := uncached_bytecode_note()) is not None:
        logger.warning("kiln: %s", note)


class PreparedPrompt(dict):
    """A prompt `prepare_prompts` has tokenized and validated ({"prompt", "prompt_token_ids",
    "token_type_ids"?, "encoder_input"?}): add_pooling_request takes it without checking it again.
    `token_array`: a pooling prompt's ids as int64 numpy, a view of its batch's."""

    token_array: np.ndarray | None = None


@dataclass
class _Parent:
    """A user request; with n > 1 it fans out into n child `Request`s that sample independently."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer | FinalDetokenizer | None] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.is_finished for c in self.children)

    @property
    def reports(self) -> bool:
        """Whether a step that advanced it returns an output (FINAL_ONLY: only the last does)."""
        return self.children[0].params.output_kind is not RequestOutputKind.FINAL_ONLY or self.finished


class LLMEngine:
    def __init__(self, config: EngineConfig, tp=None):
        """`tp`: a tensor-parallel worker's side of the group (runtime/tensor_parallel.py); an engine
        made by the user is rank 0, and starts the workers itself when config.tensor_parallel_size > 1."""
        self.config = config
        _log_uncached_bytecode()
        self._frozen_at: int | None = None  # graphs_compiled() at the last freeze_gc_heap, once called
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device)
        self.async_scheduling = (self.device.type == "cuda" if config.async_scheduling is None
                                 else config.async_scheduling)
        if self.device.type == "cuda" and self.device.index is not None and tp is None:
            # Triton kernels launch, and CUDA graphs capture, on the current device: make it this one
            torch.cuda.set_device(self.device)
        path = resolve_model_path(config.model, config.revision)
        self.hf_config = load_hf_config(path, config.hf_overrides, config.trust_remote_code)
        self.architecture, model_cls, self.tasks = resolve_architecture(
            getattr(self.hf_config, "architectures", None), config.runner, config.convert, config.model_impl,
            self.hf_config)
        self.model_impl = "transformers" if hasattr(model_cls, "load") else "kiln"
        if getattr(model_cls, "recurrent_state", False) and config.tensor_parallel_size > 1:
            raise ValueError(f"tensor_parallel_size={config.tensor_parallel_size}: {self.architecture} has layers with "
                             "a recurrent state, which run per sequence on one device (tensor_parallel_size=1)")
        self.is_pooling = config.runner == "pooling"
        self.dtype = resolve_dtype(config.dtype, self.hf_config)
        # a model may use fewer positions than its table has (RoBERTa starts counting after the pad id)
        max_positions = getattr(model_cls, "usable_positions", lambda c: c.max_position_embeddings)(self.hf_config)
        # a sentence-transformers checkpoint names the length it was trained for
        st_len = sentence_transformers_pooling(path).get("max_seq_length") if self.is_pooling else None
        self.max_model_len = config.max_model_len or min(st_len or max_positions, max_positions)
        if self.max_model_len > max_positions:
            raise ValueError(f"max_model_len={self.max_model_len} exceeds the model's max_position_embeddings={max_positions}")
        self.vocab_size = self.hf_config.vocab_size
        logger.info("kiln: %s (%s as %s, tasks %s) in %s on %s, %s", path, self.architecture, model_cls.__name__,
                    "/".join(self.tasks), self.dtype, self.device,
                    "Transformers modeling backend" if self.model_impl == "transformers" else "native implementation")

        torch.manual_seed(config.seed)
        self.checkpoint_kv_scales: dict[tuple[int, str], float] = {}  # (layer, "k" | "v") -> an fp8 cache's scale
        checkpoint_quant = checkpoint_quantization(self.hf_config)  # (a clear error for schemes kiln lacks)
        if checkpoint_quant is not None and config.quantization not in (None, checkpoint_quant.kind):
            raise ValueError(f"the checkpoint is already quantized ({checkpoint_quant.method}, {checkpoint_quant.kind}); "
                             f"quantization={config.quantization!r} cannot re-quantize it: leave quantization unset")
        # tensor parallelism: rank 0 starts the workers, each of which builds this same engine around
        # its own shard of the model (runtime/tensor_parallel.py)
        self.tp = tp
        if tp is None and config.tensor_parallel_size > 1:
            from kiln.runtime.tensor_parallel import launch

            self.tp = launch(config, self.hf_config, model_cls, self.architecture, self.device)
        shard = self.tp.shard(model_cls, self.hf_config, self.architecture) if self.tp is not None else None
        start = time.perf_counter()
        if self.model_impl == "transformers":  # transformers loads its own weights
            if checkpoint_quant is not None:
                raise ValueError(f"pre-quantized checkpoints ({checkpoint_quant.method}) load into kiln's native "
                                 f"models; {self.architecture} runs through the Transformers backend")
            self.model = model_cls.load(path, self.hf_config, self.architecture, self.dtype, self.device,
                                        config.trust_remote_code, shard=shard)
            read_kv_scales(path, self.checkpoint_kv_scales)  # (transformers skips them as unexpected keys)
        else:
            self.model = load_model(model_cls, self.hf_config, self.architecture, self.dtype, self.device, path,
                                    self.max_model_len, kv_scales=self.checkpoint_kv_scales, quant=checkpoint_quant,
                                    shard=shard)
        logger.info("kiln: model loaded in %.1f s", time.perf_counter() - start)
        self.tokenizer = None
        if not config.skip_tokenizer_init:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(
                config.tokenizer or path, trust_remote_code=config.trust_remote_code, revision=config.revision)
        self.eos_token_ids = self._eos_token_ids(path)
        self.is_encoder_decoder = getattr(self.model, "is_encoder_decoder", False)
        if hasattr(self.model, "convert_from_tokens"):
            self.model.convert_from_tokens(self.tokenizer)
        if config.quantization is not None and not getattr(self.model, "recurrent_state", False):
            self._quantize_weights()  # (before the KV cache is sized from the memory left)
        self.parents: dict[str, _Parent] = {}
        self.requests: dict[str, Request] = {}  # child id -> request, while unfinished
        self.log_steps = os.environ.get("KILN_LOG_STEPS") == "1"
        self.sampler = Sampler()
        max_batched = config.max_num_batched_tokens or max(8192, config.max_num_seqs)
        if self.is_pooling:
            self.pooler_config = self._pooler_config(config.pooler_config, path)
            make_runner = ModelRunner if self.tp is None else self.tp.make_runner
            self.runner = make_runner(self.model, 0, config.block_size, self.dtype, self.device)
            self.block_manager = None
            self.scheduler = PoolingScheduler(config.max_num_seqs, max_batched)
            self._compile(path)
            return

        block_size = config.block_size
        self.kv_cache_dtype, kv_scales = self._kv_cache_dtype()
        num_blocks, num_cross_slots = self._plan_caches(block_size)
        if self.tp is not None:  # every rank's cache holds as many blocks
            num_blocks = self.tp.agree(num_blocks)
            # (a decode batch's all-reduces through memory the ranks share, where they can)
            small = self.tp.enable_small_all_reduce(
                config.max_num_seqs * self.hf_config.get_text_config().hidden_size, self.dtype,
                custom=not config.disable_custom_all_reduce)
            if small != self.tp.backend and self.tp.rank == 0:
                logger.info("kiln: small all-reduces through %s", small)
        if self.is_encoder_decoder and num_cross_slots < 1:
            raise ValueError("the cache budget holds no cross-attention slot: give the cache more memory")
        if num_blocks * block_size < self.max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * block_size} tokens, fewer than max_model_len={self.max_model_len}: "
                "lower max_model_len or give the cache more memory (kv_cache_memory / gpu_memory_utilization)")
        make_runner = ModelRunner if self.tp is None else self.tp.make_runner
        self.runner = make_runner(self.model, num_blocks, block_size, self.dtype, self.device, num_cross_slots,
                                  self.kv_cache_dtype, kv_scales)
        # a recurrent model's state at a prefix is not stored: no prefix caching, no chunked prefill
        recurrent = getattr(self.model, "recurrent_state", False)
        # a decoder's self-attention KV depends on its encoder input too: no prefix sharing across audio
        self.block_manager = BlockManager(num_blocks, block_size, config.enable_prefix_caching
                                          and not self.is_encoder_decoder and not recurrent)
        chunked = config.enable_chunked_prefill and not recurrent
        if not chunked:
            max_batched = max(max_batched, self.max_model_len)
        state_slots = StateSlots(config.max_num_seqs) if recurrent else None
        self.runner.state_slots = state_slots
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, max_batched, chunked,
                                   CrossSlots(num_cross_slots) if self.is_encoder_decoder else None, state_slots)
        if recurrent:
            logger.info("kiln: %s has layers with a recurrent state: it runs one sequence per forward (slower than "
                        "attention-only models), without prefix caching or chunked prefill", self.architecture)
        self.feature_extractor = self._feature_extractor(path) if self.is_encoder_decoder else None
        self._compile(path)

    def _compile(self, path: str) -> None:
        """Unless eager: trace the model's forward into kiln's IR, run the passes, lower with
        Inductor (kiln ops call their device implementation), cached on disk per model build.
        A quantized model is traced even when eager, since quantization is a pass: its graph then
        runs as it is, each op's reference implementation (or kernel) called in turn."""
        eager = self.config.enforce_eager
        if eager is None:
            eager = self.device.type != "cuda"
        prequantized = any(hasattr(p, "kiln_quant") for p in self.model.parameters())
        quantized = self.config.quantization is not None or prequantized
        self.compiled = not eager
        if getattr(self.model, "recurrent_state", False):  # runs per sequence through transformers' own code
            if quantized:
                raise ValueError(f"{self.architecture} has layers with a recurrent state: it runs per sequence and "
                                 "cannot be quantized (quantization is a pass over the traced graph)")
            self.compiled = False
            return
        if eager and not quantized:
            return
        from kiln import __version__
        from kiln.codegen import compile_cache_dir, lower
        from kiln.frontend.trace import trace
        from kiln.passes import PIPELINE, run_passes

        options = dict(self.config.compilation_config or {})
        known = {"passes", "backend", "dump_ir", "cudagraph", "quantize_lm_head", "float_gemv", "pdl"}
        if set(options) - known:
            raise ValueError(f"compilation_config: unknown keys {sorted(set(options) - known)}; known: "
                             f"{', '.join(sorted(known))}")
        cudagraph = options.get("cudagraph", True)
        if cudagraph not in (True, False, "emulate"):
            raise ValueError(f"compilation_config['cudagraph'] must be True, False or 'emulate', got {cudagraph!r}")
        float_gemv = False
        if self.device.type == "cuda":
            from kiln.codegen.kernels import pdl
            from kiln.codegen.triton_ops import register_cuda_kernels, set_float_gemv

            register_cuda_kernels()
            # programmatic dependent launch of kiln's kernels (Hopper+; codegen/kernels/pdl.py)
            pdl.set_enabled(options.get("pdl", True))
            float_gemv = self._float_gemv(options)
            set_float_gemv(float_gemv)
        passes = list(options.get("passes", PIPELINE))
        if quantized and "quantize" not in passes:
            raise ValueError("a quantized model needs the 'quantize' pass: add it to compilation_config['passes']")
        backend = options.get("backend", "eager" if eager else "inductor")
        dump_dir = options.get("dump_ir")
        pass_options = {"quantize": {"scheme": self.config.quantization,
                                     "lm_head": bool(options.get("quantize_lm_head", False))},
                        # the MLP is one launch only where one-row linears run kiln's gemv; elsewhere the
                        # fused op's one-row form would hand its output on as partial sums for nothing
                        "fuse_mlp": {"one_launch": float_gemv}}
        compile_cache_dir({**self.hf_config.to_dict(), "kiln_quantization": pass_options}, self.dtype, passes,
                          str(self.device), __version__)
        counter = iter(range(1000))

        def lower_graph(graph):
            folder = os.path.join(dump_dir, f"graph{next(counter)}") if dump_dir else None
            return lower(run_passes(graph, passes, folder, pass_options), backend)

        strict = self.model_impl == "kiln"
        self.runner.forward = trace(self.model, lower_graph, strict)
        # the output projection may be 8-bit too; with float_gemv its batch-1 product is the gemv's
        if (quantized or float_gemv) and self.runner.logits is not None:
            self.runner.logits = trace(self.model, lower_graph, strict, method="compute_logits")
        logger.info("kiln: compiling with passes %s, backend %s%s (cache: %s)", passes, backend,
                    f", quantization {self.config.quantization}" if self.config.quantization else "",
                    os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
        if (not eager and (cudagraph == "emulate" or (self.device.type == "cuda" and cudagraph))
                and self.runner.kv_caches is not None):
            from kiln.runtime.cuda_graphs import DecodeGraphs

            # under tensor parallelism every rank captures the same sizes in the same order, its
            # all_reduces recorded into the graphs (NCCL captures); rank 0 captures its own shard's
            # forward, not the one that also sends the step to the workers
            forward = getattr(self.runner, "shard_forward", self.runner.forward)
            # the graphs compute the logits and their argmax too (under tensor parallelism the
            # vocabulary-parallel logits' all_gather with them, on every rank)
            logits = self.runner.logits if self.tp is None else self.tp.gathered_logits(self.runner.logits)
            graphs = DecodeGraphs(forward, self.runner.kv_caches, self.config.block_size,
                                  -(-self.max_model_len // self.config.block_size), self.runner.num_blocks,
                                  self.config.max_num_seqs, self.device, self.runner.cross_kv_caches,
                                  self.runner.kv_scales, logits, emulate=cudagraph == "emulate")
            start = time.perf_counter()
            with self.tp.step() if self.tp is not None else contextlib.nullcontext():
                graphs.capture()
            self.runner.decode_graphs = graphs
            # (the first capture runs the first forward, which is when torch.compile compiles)
            logger.info("kiln: compiled and captured decode CUDA graphs for batch sizes %s in %.1f s", graphs.sizes,
                        time.perf_counter() - start)

    # ------------------------------------------------------------ setup helpers

    def _quantize_weights(self) -> None:
        """On-the-fly quantization happens at load: the weights the quantize pass will rewrite
        become 8-bit parameters with their scales, as a pre-quantized checkpoint's, and their float
        values are freed (frontend/quantization.py); the pass then rewrites them as it does those."""
        lm_head = bool((self.config.compilation_config or {}).get("quantize_lm_head", False))
        freed, made = quantize_weights(self.model, self.config.quantization, lm_head)
        if self.device.type == "cuda":  # hand the float weights' memory back, where mem_get_info sees it
            torch.cuda.empty_cache()
        logger.info("kiln: quantized weights to %s at load: %.1f MiB of float weights now %.1f MiB",
                    self.config.quantization, freed / 2**20, made / 2**20)

    def _eos_token_ids(self, path: str) -> frozenset[int]:
        ids: set[int] = set()
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(path).eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except OSError:
            pass  # no generation_config.json
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        if not ids and getattr(self.hf_config, "eos_token_id", None) is not None:
            eos = self.hf_config.eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos])
        return frozenset(ids)

    def _pooler_config(self, user, path: str) -> PoolerConfig:
        """The user's PoolerConfig, its gaps filled from the checkpoint's sentence-transformers
        config, then from the model's defaults."""
        config = PoolerConfig.coerce(user)
        st = sentence_transformers_pooling(path)
        if config.pooling_type is None:
            config.pooling_type = st.get("pooling_type") or self.model.default_pooling_type
        if config.normalize is None and "normalize" in st:
            config.normalize = st["normalize"]
        return config

    def _kv_cache_dtype(self) -> tuple[torch.dtype, list[tuple[float, float]] | None]:
        """The self-attention KV cache's dtype and, for an fp8 cache, each layer's (k_scale,
        v_scale): the checkpoint's where it ships them, else 1.0 (as vLLM)."""
        if self.config.kv_cache_dtype == "auto":
            return self.dtype, None
        if (self.device.type == "cuda" and self.config.enforce_eager is not True
                and torch.cuda.get_device_capability(self.device) < (8, 9)):
            raise ValueError(f"kv_cache_dtype={self.config.kv_cache_dtype!r} runs Triton's float8e4nv kernels, which "
                             "need compute capability >= 8.9 (Ada, Hopper): pass enforce_eager=True to use the "
                             "reference ops on this GPU")
        found = self.checkpoint_kv_scales
        layers = (self.model.kv_scale_layers() if hasattr(self.model, "kv_scale_layers")
                  else range(len(kv_cache_layers(self.model))))
        scales = [(found.get((i, "k"), 1.0), found.get((i, "v"), 1.0)) for i in layers]
        logger.info("kiln: fp8 KV cache (float8_e4m3fn), %s", "scales from the checkpoint" if found else
                    "no scales in the checkpoint: k_scale = v_scale = 1.0")
        return torch.float8_e4m3fn, scales

    def _plan_caches(self, block_size: int) -> tuple[int, int]:
        """(KV blocks, cross-attention slots) from the memory budget: free device memory times
        gpu_memory_utilization on CUDA, `kv_cache_memory` (default 1 GiB) on CPU. An
        encoder-decoder model gives up to half the budget to cross slots (one per running request)."""
        if self.device.type == "cuda" and self.config.kv_cache_memory is None:
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * self.config.gpu_memory_utilization) - (total - free) - self._compile_reserve()
        else:
            budget = self.config.kv_cache_memory or _DEFAULT_CPU_KV_CACHE_MEMORY
        num_cross_slots = 0
        if self.is_encoder_decoder:
            per_slot = ModelRunner.bytes_per_cross_slot(self.model, self.dtype)
            num_cross_slots = min(self.config.max_num_seqs, budget // 2 // per_slot)
            budget -= num_cross_slots * per_slot
        if self.config.num_gpu_blocks_override is not None:
            return self.config.num_gpu_blocks_override, num_cross_slots
        per_block = ModelRunner.bytes_per_block(self.model, block_size, self.kv_cache_dtype)
        if per_block == 0:  # no attention layer in kiln's cache (a per-sequence model): blocks only count tokens
            return 2 * self.config.max_num_seqs * -(-self.max_model_len // block_size), num_cross_slots
        # never more than every sequence at full length needs (plus room for the prefix cache)
        useful = 2 * self.config.max_num_seqs * -(-self.max_model_len // block_size)
        return max(min(budget // per_block, useful), 0), num_cross_slots

    def _float_gemv(self, options: dict) -> bool:
        """Whether one-row float linears run kiln's gemv on this CUDA device (compilation_config's
        `float_gemv`): by default where its kernels chain with PDL (`pdl`, on unless asked off): on
        an H100 1.397 ms/token against cuBLAS's 1.502 (without PDL the gemv was the slower, 1.555)."""
        from kiln.codegen.kernels import pdl

        return bool(options.get("float_gemv", options.get("pdl", True) and pdl.use_pdl(self.device)))

    def _compile_reserve(self) -> int:
        """Bytes the compile will allocate for weights after the KV cache is sized: the fuse_mlp pass's
        transposed copies of down weights, where it runs (compiled on a device whose one-row linears
        run kiln's gemv: see `_compile`; not under tensor parallelism, whose down projections are
        row-parallel `linear_all_reduce`s the pass leaves alone)."""
        from kiln.passes import PIPELINE

        options = self.config.compilation_config or {}
        if (self.config.enforce_eager or self.model_impl != "kiln" or self.tp is not None
                or "fuse_mlp" not in options.get("passes", PIPELINE) or not self._float_gemv(options)):
            return 0
        from kiln.passes.fuse_mlp import transposed_bytes

        return transposed_bytes(self.model)

    def _feature_extractor(self, path: str):
        from transformers import WhisperFeatureExtractor

        if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
            return WhisperFeatureExtractor.from_pretrained(path)
        return WhisperFeatureExtractor(feature_size=self.hf_config.num_mel_bins)

    # ------------------------------------------------------------ requests

    def tokenize(self, prompt, pooling: bool = False, truncate: int | None = None):
        """A prompt as the API takes it (a string, or a dict with "prompt" or "prompt_token_ids" and
        optionally "token_type_ids") -> (text, token ids, token type ids or None), validated.
        `truncate` (pooling): keep at most that many tokens, -1 meaning max_model_len."""
        text, token_types = None, None
        if isinstance(prompt, dict):
            token_types = prompt.get("token_type_ids")
            if "prompt_token_ids" in prompt:  # (with "prompt" too when the caller tokenized it already)
                ids, text = prompt["prompt_token_ids"], prompt.get("prompt")
            elif "prompt" in prompt:
                text = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, str):
            text = prompt
        else:
            raise ValueError(f"a prompt must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")
        limit = self.max_model_len if truncate == -1 else truncate
        if text is not None and not (isinstance(prompt, dict) and "prompt_token_ids" in prompt):
            if not isinstance(text, str):
                raise ValueError(f"prompt must be a string, got {type(text).__name__}")
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer: pass prompt_token_ids when skip_tokenizer_init=True")
            # the tokenizer's own truncation keeps its special tokens in place; a decoder prompt of an
            # encoder-decoder model is spelled out token by token (Whisper's tokenizer would add its own)
            kwargs = {"truncation": True, "max_length": limit} if limit is not None else {}
            ids = self.tokenizer(text, add_special_tokens=not self.is_encoder_decoder, **kwargs).input_ids
        elif limit is not None and isinstance(ids, (list, tuple)):
            ids, token_types = ids[:limit], token_types[:limit] if token_types is not None else None
        array = np.asarray(ids) if isinstance(ids, (list, tuple)) else None
        if array is None or (len(ids) and (array.ndim != 1 or array.dtype.kind not in "iu")):
            raise ValueError("prompt_token_ids must be a list of integers")
        self._check_vocab(array)
        self._check_length(len(ids), pooling)
        if token_types is not None and len(token_types) != len(ids):
            raise ValueError(f"token_type_ids has {len(token_types)} entries for {len(ids)} tokens")
        return text, list(ids), (list(token_types) if token_types is not None else None)

    def _check_vocab(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")

    def _check_length(self, num_tokens: int, pooling: bool) -> None:
        if num_tokens == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if pooling and num_tokens > self.max_model_len:
            raise ValueError(f"the prompt has {num_tokens} tokens, more than max_model_len={self.max_model_len}; "
                             "pass truncate_prompt_tokens to truncate it")
        if not pooling and num_tokens >= self.max_model_len:
            raise ValueError(f"the prompt has {num_tokens} tokens; max_model_len={self.max_model_len} leaves no room to generate "
                             f"(the prompt must be shorter than max_model_len)")

    # whether the Rust backend's encode_batch_fast gives the tokenizer's own ids (checked on first use)
    _backend_encodes: bool | None = None

    def _encode_texts(self, texts: list[str], limit: int | None) -> list[list[int]]:
        """The tokenizer's ids for a batch of texts, truncated to `limit` tokens when given. A fast
        tokenizer's batch goes to its Rust backend's `encode_batch_fast` (no offsets, no per-text
        conversion: about a fifth less time); the first text, through the tokenizer itself, sets the
        backend up (truncation, special tokens) and checks that both give the same ids."""
        kwargs = {"truncation": True, "max_length": limit} if limit is not None else {}
        kwargs |= {"add_special_tokens": not self.is_encoder_decoder, "return_attention_mask": False,
                   "return_token_type_ids": False}
        if self._backend_encodes is None:
            from transformers import PreTrainedTokenizerFast

            # only a tokenizer that leaves encoding to the base class: one that overrides it may do more
            self._backend_encodes = isinstance(self.tokenizer, PreTrainedTokenizerFast) and all(
                getattr(type(self.tokenizer), m, None) is getattr(PreTrainedTokenizerFast, m, None)
                for m in ("__call__", "_call_one", "_encode_plus", "_batch_encode_plus", "set_truncation_and_padding"))
        fast = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "encode_batch_fast", None)
        if fast is None or not self._backend_encodes or len(texts) < 2:
            return self.tokenizer(texts, **kwargs).input_ids
        first = self.tokenizer(texts[:1], **kwargs).input_ids[0]
        ids = [e.ids for e in fast(texts, add_special_tokens=kwargs["add_special_tokens"])]
        if ids[0] != first:  # the backend is not the whole story: always ask the tokenizer
            self._backend_encodes = False
            return self.tokenizer(texts, **kwargs).input_ids
        return ids

    def prepare_prompts(self, prompts: list, pooling: bool = False, truncates: list[int | None] | None = None) -> list[dict]:
        """Validate and tokenize a batch of prompts, the text ones in one batched tokenizer call
        per truncation length; -> {"prompt", "prompt_token_ids", "token_type_ids"?} dicts that
        add_request / add_pooling_request take without tokenizing again."""
        truncates = truncates or [None] * len(prompts)
        audio = [None] * len(prompts)
        if self.is_encoder_decoder:
            split = [self.encoder_decoder_prompt(p) for p in prompts]
            prompts, audio = [d for d, _ in split], [f for _, f in split]
        texts: dict[int | None, list[int]] = {}
        for i, prompt in enumerate(prompts):
            if isinstance(prompt, str) or (isinstance(prompt, dict) and "prompt_token_ids" not in prompt
                                           and isinstance(prompt.get("prompt"), str)):
                texts.setdefault(truncates[i], []).append(i)
        encoded: dict[int, list[int]] = {}
        if texts and self.tokenizer is not None:
            for truncate, idx in texts.items():
                batch = [prompts[i] if isinstance(prompts[i], str) else prompts[i]["prompt"] for i in idx]
                for i, ids in zip(idx, self._encode_texts(batch, self.max_model_len if truncate == -1 else truncate)):
                    encoded[i] = ids
        prepared = []
        for i, prompt in enumerate(prompts):
            if i in encoded and isinstance(prompt, str):  # our tokenizer's ids: their vocabulary is checked below
                text, ids, types = prompt, encoded[i], None
                self._check_length(len(ids), pooling)
            else:
                if i in encoded:
                    prompt = {**prompt, "prompt_token_ids": encoded[i]}
                text, ids, types = self.tokenize(prompt, pooling, truncates[i])
            prepared.append(PreparedPrompt({"prompt": text, "prompt_token_ids": ids}
                                           | ({"token_type_ids": types} if types is not None else {})
                                           | ({"encoder_input": audio[i]} if audio[i] is not None else {})))
        # every prompt's ids in one int64 array: one vocabulary check, and a pooling step's input ids
        # are then one concatenate of views
        lens = [len(p["prompt_token_ids"]) for p in prepared]
        flat = np.fromiter(itertools.chain.from_iterable(p["prompt_token_ids"] for p in prepared), np.int64, sum(lens))
        self._check_vocab(flat)
        if pooling:
            start = 0
            for p, n in zip(prepared, lens):
                p.token_array, start = flat[start:start + n], start + n
        return prepared

    def encoder_decoder_prompt(self, prompt) -> tuple[dict | str, torch.Tensor]:
        """An encoder-decoder prompt, as vLLM takes it -> (decoder prompt, encoder features):
        {"prompt": decoder text, "multi_modal_data": {"audio": (waveform, sample_rate)}} or
        {"encoder_prompt": {"prompt": "", "multi_modal_data": {...}}, "decoder_prompt": ...}."""
        from kiln.runtime.audio import load_audio, log_mel

        if isinstance(prompt, dict) and "encoder_input" in prompt:
            return prompt, prompt["encoder_input"]
        if isinstance(prompt, dict) and "encoder_prompt" in prompt:
            encoder, decoder = prompt["encoder_prompt"], prompt.get("decoder_prompt")
            data = encoder.get("multi_modal_data") if isinstance(encoder, dict) else None
        elif isinstance(prompt, dict) and "multi_modal_data" in prompt:
            data = prompt["multi_modal_data"]
            decoder = {k: v for k, v in prompt.items() if k in ("prompt", "prompt_token_ids")}
        else:
            data = decoder = None
        if not isinstance(data, dict) or data.get("audio") is None:
            raise ValueError(f"{self.architecture} transcribes audio: pass {{'prompt': ..., 'multi_modal_data': "
                             "{'audio': (waveform, sample_rate)}}, or use LLM.transcribe")
        if decoder is None or decoder == {}:
            decoder = "<|startoftranscript|>"
        return decoder, log_mel(self.feature_extractor, load_audio(data["audio"]))

    def add_request(self, request_id: str, prompt, params: SamplingParams, priority: int = 0) -> None:
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if self.is_pooling:
            raise ValueError(f"this is a pooling model ({self.architecture}, tasks {'/'.join(self.tasks)}): "
                             "use embed/classify/score/reward/encode, or load it with runner='generate'")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        if any(t >= self.vocab_size for t in params.stop_token_ids + (params.allowed_token_ids or [])):
            raise ValueError(f"stop_token_ids and allowed_token_ids must be < vocab size {self.vocab_size}")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(params, name) or 0) > self.vocab_size:
                raise ValueError(f"SamplingParams.{name}={getattr(params, name)} exceeds the vocabulary size {self.vocab_size}")
        encoder_input = None
        if self.is_encoder_decoder:
            prompt, encoder_input = self.encoder_decoder_prompt(prompt)
        text, ids, _ = self.tokenize(prompt)
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init=True)")
        room = self.max_model_len - len(ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        params = params.clone(_eos_token_ids=self.eos_token_ids)
        children = [
            Request(request_id if params.n == 1 else f"{i}_{request_id}", ids,
                    params if params.seed is None else params.clone(seed=(params.seed + i) % 2**63), max_tokens, priority)
            for i in range(params.n)
        ]
        parent = _Parent(request_id, text, ids, children)
        for child in children:
            child.encoder_input = encoder_input
            detok = None
            if self.tokenizer is not None and params.detokenize:
                detok = make_detokenizer(self.tokenizer, ids, child.output_token_ids, params)
            child.parent, child.index = parent, len(parent.detokenizers)
            parent.detokenizers.append(detok)
            self.requests[child.request_id] = child
            self.scheduler.add(child)
        self.parents[request_id] = parent

    def add_pooling_request(self, request_id: str, prompt, params: PoolingParams) -> None:
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not self.is_pooling:
            raise ValueError(f"{self.architecture} is loaded for generation: pass runner='pooling' to "
                             f"{params.task or 'encode'} with it")
        task = params.task or self.tasks[0]
        if task not in self.tasks and not (task == "encode"):
            raise ValueError(f"{self.architecture} serves {'/'.join(self.tasks)}, not {task!r}"
                             + (" (try convert='classify' or 'embed')" if task in ("embed", "classify") else ""))
        limit = self.max_model_len if params.truncate_prompt_tokens == -1 else params.truncate_prompt_tokens
        if isinstance(prompt, PreparedPrompt) and (limit is None or len(prompt["prompt_token_ids"]) <= limit):
            text, ids, token_types = prompt["prompt"], prompt["prompt_token_ids"], prompt.get("token_type_ids")
        else:
            text, ids, token_types = self.tokenize(prompt, pooling=True, truncate=params.truncate_prompt_tokens)
            prompt = None
        params = params if params.task == task else params.clone(task=task)
        req = Request(request_id, ids, None, 0, pooling_params=params, token_type_ids=token_types)
        req.prompt_token_array = prompt.token_array if prompt is not None else None
        parent = _Parent(request_id, text, ids, [req], [None])
        req.parent = parent
        self.requests[request_id] = req
        self.parents[request_id] = parent
        self.scheduler.add(req)

    def abort_request(self, request_ids) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            parent = self.parents.pop(rid, None)
            for child in parent.children if parent else []:
                if not child.is_finished:
                    self.scheduler.finish(child, RequestStatus.FINISHED_ABORTED)
                self.requests.pop(child.request_id, None)
        in_flight = self._pooling_in_flight
        if in_flight is not None and all(r.is_finished for r in in_flight[0]):
            self._pooling_in_flight = None  # its outputs are no one's now (the copy to the host may land later)

    # a pooling step queued on the device whose outputs are not collected yet: (its requests, outputs)
    _pooling_in_flight: tuple[list[Request], PooledStep] | None = None

    # async scheduling: the last launched step's sampled tokens, still on the device
    _inflight: PendingTokens | None = None

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._pooling_in_flight is not None or self._inflight is not None

    def shutdown(self) -> None:
        """Stop the tensor-parallel workers, if any (an engine of one rank has nothing to stop)."""
        if self.tp is not None:
            self.tp.shutdown()

    # ------------------------------------------------------------ the step

    def step(self, *, more_coming: bool = False) -> list[RequestOutput]:
        """Run one scheduler step; return an output for every user request that progressed.
        `more_coming`: the caller queues more requests before its next step (an offline pooling
        call preparing its prompts in chunks), so a pooling step may stay in flight until then."""
        if self.is_pooling:
            outputs = self._pooling_step(more_coming)
        elif self._can_overlap():
            outputs = self._async_step()
        else:
            outputs = self._collect(self._inflight) if self._inflight is not None else []
            self._inflight = None
            outputs += self._step()
        if self._frozen_at is not None and self._frozen_at != graphs_compiled():
            self.freeze_gc_heap()  # this step compiled (a first forward): freeze what it left
        return outputs

    def freeze_gc_heap(self) -> None:
        """`freeze_gc_heap()` now, and again after any later step that compiles. Models compiled
        without decode CUDA graphs (pooling models, anything on a CPU) compile on their first
        forward, after the engine's start, and Dynamo and Inductor leave a few hundred thousand
        tracked objects: unfrozen, they made every full collection during an `embed` call of 2048
        sentences a pause of about 0.2 s (H100 host)."""
        freeze_gc_heap()
        self._frozen_at = graphs_compiled()

    def _step(self) -> list[RequestOutput]:
        step = self.scheduler.schedule()
        if self.log_steps:
            logger.info("%s | free blocks %d/%d", step, self.block_manager.num_free_blocks, self.block_manager.num_blocks)
        if not step.scheduled:
            return []
        try:
            to_encode = [r for r, _ in step.scheduled if r.encoder_input is not None and not r.encoded]
            if to_encode:  # encoder runs of newly admitted requests, batched, before the decoder step
                self.runner.encode(to_encode)
            hidden, rows = self.runner.execute(step)
            logit_rows = rows.logit_rows
            logits = self.runner.compute_logits(hidden, logit_rows, rows.device_rows) if logit_rows else None
            sampled = self.sampler(logits[:len(rows.sample)], [r for r, _ in rows.sample],
                                   self.runner.captured_greedy(logits)) if rows.sample else None
        except Exception as e:
            self._fail_step([req for req, _ in step.scheduled], e)

        self._advance(step)
        if rows.prompt:
            self._record_prompt_logprobs(logits[len(rows.sample):], rows.prompt)
        progressed = {}
        for i, (req, _) in enumerate(rows.sample):
            self._append_token(req, i, sampled)
            progressed[req.parent.request_id] = req.parent
        return [self._output(p) for p in progressed.values() if p.reports]

    def _advance(self, step) -> None:
        """The step's tokens are (being) computed: count them, and register newly full blocks."""
        for req, n in step.scheduled:
            req.num_computed_tokens += n
            self.block_manager.cache_full_blocks(req)

    def _fail_step(self, requests: list[Request], error: Exception) -> NoReturn:
        """A model step failed: its requests' user requests are aborted; the engine and every other
        request go on."""
        failed = {req.parent.request_id for req in requests}
        for rid in failed:
            self.abort_request(rid)
        fused_mlp = sys.modules.get("kiln.codegen.kernels.fused_mlp")
        if fused_mlp is not None:  # a forward stopped between fused MLPs leaves partial sums to zero
            fused_mlp.reset_all()
        raise RuntimeError(f"model step failed for requests {sorted(failed)}: {error}") from error

    # ------------------------------------------------------------ async scheduling

    def _can_overlap(self) -> bool:
        """Whether this step may be launched before the last one's tokens are read: asked for, a
        decoder-only model, and no live request whose sampling needs its previous token on the host
        (logprobs, penalties, min_tokens: they read the history). Under tensor parallelism a decode
        step the CUDA graphs cover broadcasts the tokens on the device; another step's inputs go to
        the workers from the host, which then waits for them."""
        if not self.async_scheduling or self.is_encoder_decoder:
            return False
        for req in self.requests.values():
            p = req.params
            if (p.logprobs is not None or p.prompt_logprobs is not None or p.min_tokens or p.repetition_penalty != 1.0
                    or p.frequency_penalty or p.presence_penalty):
                return False
        return True

    def _async_step(self) -> list[RequestOutput]:
        """Launch this step (its decode rows take the last step's tokens on the device), then read
        back and process the last step while the device runs this one."""
        previous = self._inflight
        step = self.scheduler.schedule()
        if self.log_steps:
            logger.info("%s | free blocks %d/%d", step, self.block_manager.num_free_blocks, self.block_manager.num_blocks)
        if not step.scheduled:
            self._inflight = None
            return self._collect(previous) if previous is not None else []
        try:
            hidden, rows = self.runner.execute(step, previous)
            sample = [r for r, _ in rows.sample]
            index = rows.device_rows[:len(sample)] if rows.device_rows is not None else None
            logits = self.runner.compute_logits(hidden, [row for _, row in rows.sample], index) if sample else None
            tokens = self.sampler.tokens(logits, sample, self.runner.captured_greedy(logits)) if sample else None
        except Exception as e:
            self._inflight = None
            self._fail_step([req for req, _ in step.scheduled] + list(previous.index if previous is not None else ()), e)
        self._advance(step)
        for req in sample:
            req.num_pending += 1
            # a request this token ends by length is scheduled no more (its blocks go when it finishes)
            if (len(req.output_token_ids) + req.num_pending >= req.max_tokens
                    or req.num_tokens >= self.max_model_len) and req in self.scheduler.running:
                self.scheduler.running.remove(req)
        self._inflight = PendingTokens(tokens, {req: i for i, req in enumerate(sample)}) if sample else None
        return self._collect(previous) if previous is not None else []

    def _collect(self, launched: PendingTokens) -> list[RequestOutput]:
        """Read a launched step's tokens back and give them to their requests, in order."""
        token_ids = launched.token_ids()
        sampled = SamplerOutput(token_ids, None, None, None)
        progressed = {}
        for req, i in launched.index.items():
            if req.is_finished:  # aborted, or stopped by the step before (its token here is void)
                continue
            req.num_pending -= 1
            self._append_token(req, i, sampled)
            progressed[req.parent.request_id] = req.parent
        return [self._output(p) for p in progressed.values() if p.reports]

    def _pooling_step(self, more_coming: bool = False) -> list[PoolingRequestOutput]:
        """Queue this step's forward and pooling on the device, then collect the previous step's
        outputs while the device runs this one, so the host's work overlaps the device's. A step
        stays in flight only while another one follows it (requests are waiting, or `more_coming`);
        the last is collected at once."""
        step = self.scheduler.schedule()
        launched = None
        if step.scheduled:
            reqs = [r for r, _ in step.scheduled]
            try:
                hidden, batch = self.runner.execute_pooling(step)
                with torch.inference_mode():
                    launched = reqs, pool_step(hidden, batch, [r.pooling_params for r in reqs], self.pooler_config,
                                               self.model)
            except Exception as e:
                self._fail_pooling(reqs, e)
        previous, self._pooling_in_flight = self._pooling_in_flight, launched
        outputs = self._collect_pooling(*previous) if previous is not None else []
        if launched is not None and not self.scheduler.waiting and not more_coming:
            self._pooling_in_flight = None
            outputs += self._collect_pooling(*launched)
        return outputs

    def _collect_pooling(self, reqs: list[Request], pooled: PooledStep) -> list[PoolingRequestOutput]:
        """Wait for a pooling step's outputs and finish its requests (those aborted meanwhile are skipped)."""
        try:
            data = pooled.result()
        except Exception as e:
            self._fail_pooling(reqs, e)
        outputs = []
        for req, out in zip(reqs, data):
            if req.is_finished:  # aborted while in flight
                continue
            req.status = RequestStatus.FINISHED_STOPPED  # (a scheduled pooling request is in no queue)
            self.requests.pop(req.request_id, None)
            parent = self.parents.pop(req.request_id)
            outputs.append(PoolingRequestOutput(req.request_id, PoolingOutput(out), req.prompt_token_ids, True,
                                                parent.prompt))
        return outputs

    def _fail_pooling(self, reqs: list[Request], error: Exception) -> NoReturn:
        """A pooling step failed: its requests are aborted, the engine and every other request go on."""
        failed = [r.request_id for r in reqs if not r.is_finished]
        for req in reqs:
            if not req.is_finished:
                self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
                self.abort_request(req.request_id)
        raise RuntimeError(f"pooling step failed for requests {failed}: {error}") from error

    def _append_token(self, req: Request, i: int, sampled) -> None:
        token = sampled.token_ids[i]
        req.output_token_ids.append(token)
        if req.logprobs is not None:
            req.cumulative_logprob += sampled.logprobs[i]
            entry = {token: Logprob(sampled.logprobs[i], sampled.ranks[i], self._decode(token))}
            for rank, (tid, lp) in enumerate(sampled.topk[i], start=1):
                entry.setdefault(tid, Logprob(lp, rank, self._decode(tid)))
            req.logprobs.append(entry)
        parent, p = req.parent, req.params
        detok = parent.detokenizers[req.index]
        delta = detok.add(token) if detok is not None else ""
        status = None
        num_out = len(req.output_token_ids)
        if num_out >= p.min_tokens:
            if not p.ignore_eos and token in p._eos_token_ids:
                status = RequestStatus.FINISHED_STOPPED
            elif token in p.stop_token_ids:
                status, req.stop_reason = RequestStatus.FINISHED_STOPPED, token
            elif p.stop and detok is not None and delta:
                hit = find_stop(detok.text, len(delta), p.stop, p.include_stop_str_in_output)
                if hit is not None:
                    detok.text, req.stop_reason = hit
                    status = RequestStatus.FINISHED_STOPPED
        if status is None and (num_out >= req.max_tokens
                               or len(req.prompt_token_ids) + num_out >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            self.scheduler.finish(req, status)
            self.requests.pop(req.request_id, None)

    def _record_prompt_logprobs(self, logits: torch.Tensor, prompt_rows) -> None:
        logprobs = logits.log_softmax(-1)
        offset = 0
        for req, rs, predicted in prompt_rows:
            lp = logprobs[offset:offset + len(rs)]
            offset += len(rs)
            targets = torch.tensor([req.prompt_token_ids[p] for p in predicted], device=lp.device)
            chosen = lp.gather(1, targets[:, None])
            ranks = ((lp > chosen).sum(-1) + 1).tolist()
            k = req.params.prompt_logprobs
            top = lp.topk(k, dim=-1) if k else None
            for j, tid in enumerate(targets.tolist()):
                entry = {tid: Logprob(chosen[j, 0].item(), ranks[j], self._decode(tid))}
                if top is not None:
                    for rank, (t, v) in enumerate(zip(top.indices[j].tolist(), top.values[j].tolist()), start=1):
                        entry.setdefault(t, Logprob(v, rank, self._decode(t)))
                req.prompt_logprobs.append(entry)

    def _decode(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None

    def _output(self, parent: _Parent) -> RequestOutput:
        outputs = []
        for child, detok in zip(parent.children, parent.detokenizers):
            outputs.append(CompletionOutput(
                index=child.index, text=detok.text if detok is not None else "",
                token_ids=list(child.output_token_ids),
                cumulative_logprob=child.cumulative_logprob if child.logprobs is not None else None,
                logprobs=child.logprobs,
                finish_reason=child.status.value if child.is_finished else None,
                stop_reason=child.stop_reason))
        finished = parent.finished
        if finished:
            self.parents.pop(parent.request_id, None)
        first = parent.children[0]
        return RequestOutput(parent.request_id, parent.prompt, parent.prompt_token_ids, first.prompt_logprobs,
                             outputs, finished, num_cached_tokens=first.num_cached_tokens)
