"""The Transformers modeling backend against HF transformers itself, over every text-generation
and pooling architecture of the supported-models page that the installed transformers ships.

Each architecture gets a tiny random float32 checkpoint built from its own config class, shrunk
generically (`tiny_config`); generation compares greedy tokens and logprobs with HF `generate`,
pooling compares pooled outputs with HF's forward. Known failures are xfails with their reason
(`KNOWN_FAILURES`); the session ends with a summary of how many ran, passed and failed
(tests/models/conftest.py). Also here: custom models (auto_map, trust_remote_code), the native
families through the backend, the KV-cache layout probe, recurrent-state models run per sequence
(batched equals alone, state slots freed on preemption and abort), and the compiled path.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AutoConfig

from kiln import LLM, SamplingParams

# The first column of each table of ../shared/reference/supported_models.md ("List of Text-only
# Language Models": Text Generation; Embedding, Classification, Cross-encoder / Reranker, Reward
# Modeling, Token Classification), `*Model`-style wildcards left out.
TEXT_GENERATION = (
    "AfmoeForCausalLM", "ApertusForCausalLM", "AquilaForCausalLM", "ArceeForCausalLM", "ArcticForCausalLM",
    "BaiChuanForCausalLM", "BailingMoeForCausalLM", "BailingMoeV2ForCausalLM", "BambaForCausalLM",
    "BloomForCausalLM", "ChatGLMModel", "ChatGLMForConditionalGeneration", "CohereForCausalLM",
    "Cohere2ForCausalLM", "DbrxForCausalLM", "DeciLMForCausalLM", "DeepseekForCausalLM", "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM", "Dots1ForCausalLM", "DotsOCRForCausalLM", "Ernie4_5ForCausalLM",
    "Ernie4_5_MoeForCausalLM", "ExaoneForCausalLM", "ExaoneMoeCausalLM", "Exaone4ForCausalLM",
    "Fairseq2LlamaForCausalLM", "FalconForCausalLM", "FalconMambaForCausalLM", "FalconH1ForCausalLM",
    "FlexOlmoForCausalLM", "GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM",
    "GlmForCausalLM", "Glm4ForCausalLM", "Glm4MoeForCausalLM", "GPT2LMHeadModel", "GPTBigCodeForCausalLM",
    "GPTJForCausalLM", "GPTNeoXForCausalLM", "GptOssForCausalLM", "GraniteForCausalLM", "GraniteMoeForCausalLM",
    "GraniteMoeHybridForCausalLM", "GraniteMoeSharedForCausalLM", "GritLM", "Grok1ModelForCausalLM",
    "Grok1ForCausalLM", "HunYuanDenseV1ForCausalLM", "HunYuanMoEV1ForCausalLM", "HCXVisionForCausalLM",
    "InternLMForCausalLM", "InternLM2ForCausalLM", "InternLM3ForCausalLM", "IQuestCoderForCausalLM",
    "IQuestLoopCoderForCausalLM", "JAISLMHeadModel", "Jais2ForCausalLM", "JambaForCausalLM",
    "KimiLinearForCausalLM", "Lfm2ForCausalLM", "Lfm2MoeForCausalLM", "LlamaForCausalLM", "MambaForCausalLM",
    "Mamba2ForCausalLM", "MiMoForCausalLM", "MiMoV2FlashForCausalLM", "MiniCPMForCausalLM", "MiniCPM3ForCausalLM",
    "MiniMaxM2ForCausalLM", "MistralForCausalLM", "MistralLarge3ForCausalLM", "MixtralForCausalLM",
    "MPTForCausalLM", "NemotronForCausalLM", "NemotronHForCausalLM", "OLMoForCausalLM", "OLMo2ForCausalLM",
    "OLMo3ForCausalLM", "OLMoEForCausalLM", "OPTForCausalLM", "OrionForCausalLM", "OuroForCausalLM",
    "PanguEmbeddedForCausalLM", "PanguProMoEV2ForCausalLM", "PanguUltraMoEForCausalLM", "PhiForCausalLM",
    "Phi3ForCausalLM", "PhiMoEForCausalLM", "PersimmonForCausalLM", "Plamo2ForCausalLM", "Plamo3ForCausalLM",
    "QWenLMHeadModel", "Qwen2ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM",
    "Qwen3NextForCausalLM", "SeedOssForCausalLM", "SolarForCausalLM", "StableLmForCausalLM",
    "Starcoder2ForCausalLM", "Step1ForCausalLM", "TeleChat2ForCausalLM", "TeleFLMForCausalLM",
    "XverseForCausalLM", "MiniMaxM1ForCausalLM", "MiniMaxText01ForCausalLM", "Zamba2ForCausalLM",
    "LongcatFlashForCausalLM", "SmolLM3ForCausalLM",
)
EMBEDDING = (
    "BertModel", "BertSpladeSparseEmbeddingModel", "Gemma2Model", "Gemma3TextModel", "GritLM", "GteModel",
    "GteNewModel", "ModernBertModel", "NomicBertModel", "LlamaBidirectionalModel", "LlamaModel", "LlamaForCausalLM",
    "MistralModel", "Qwen2Model", "Qwen2ForCausalLM", "Qwen3Model", "Qwen3ForCausalLM", "RobertaModel",
    "RobertaForMaskedLM",
)
CLASSIFICATION = (  # the Classification and Cross-encoder / Reranker tables
    "JambaForSequenceClassification", "GPT2ForSequenceClassification", "BertForSequenceClassification",
    "GemmaForSequenceClassification", "GteNewForSequenceClassification",
    "LlamaBidirectionalForSequenceClassification", "Qwen2ForSequenceClassification",
    "Qwen3ForSequenceClassification", "RobertaForSequenceClassification", "XLMRobertaForSequenceClassification",
)
REWARD = ("InternLM2ForRewardModel", "LlamaForCausalLM", "Qwen2ForRewardModel", "Qwen2ForProcessRewardModel")
TOKEN_CLASSIFICATION = ("BertForTokenClassification", "ModernBertForTokenClassification")

_TABLES = {"generate": TEXT_GENERATION, "embed": EMBEDDING, "classify": CLASSIFICATION, "reward": REWARD,
           "token_classify": TOKEN_CLASSIFICATION}
_SHIPPED = set(dir(transformers))  # the lazy module lists its names without importing every model
CASES = [(task, arch) for task, archs in _TABLES.items() for arch in archs if arch in _SHIPPED]

# Config fields shrunk wherever the architecture's config class has them (under its own name for
# the field, through the config's attribute_map: GPT-2's n_embd for hidden_size).
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    head_dim=16, rotary_dim=8, max_position_embeddings=512, initializer_range=0.2, init_std=0.2, ffn_dim=128,
    word_embed_proj_dim=64,
    num_layers=2,  # LongCat-Flash's own layer count (two attention sublayers each)
    # mixture of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, moe_k=2,
    moe_topk=2, moe_intermediate_size=32, n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1,
    shared_expert_intermediate_size=32, moe_shared_expert_intermediate_size=32, shared_intermediate_size=32,
    expert_ffn_hidden_size=32, n_group=1, topk_group=1, num_expert_group=1, first_k_dense_replace=1,
    moe_layer_start_index=1, num_dense_layers=1, decoder_sparse_step=1, zero_expert_num=2,
    # multi-head latent attention (its rotary part is the head_dim the rotary table is built for)
    q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    # sliding window (ModernBERT's bidirectional local_attention too): shorter than the prompts
    sliding_window=8, max_window_layers=1, local_attention=8,
)
# Latent-attention configs (those with qk_rope_head_dim) derive head_dim from the rotary part, and
# expand the latent keys and values to every head.
_LATENT = dict(head_dim=TINY["qk_rope_head_dim"], qk_head_dim=TINY["qk_nope_head_dim"] + TINY["qk_rope_head_dim"],
               num_key_value_heads=TINY["num_attention_heads"])

# What some architectures need beyond the generic shrinking: data only.
OVERRIDES: dict[str, dict] = {
    # transformers 5.24's DbrxAttention reads attn_config.rope_theta and clamps with clip_qkv
    "DbrxForCausalLM": dict(attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                            ffn_config={"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}),
    # KV sharing: the last layers of each kind reuse an earlier layer's keys and values
    "Gemma3nForCausalLM": dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                               num_kv_shared_layers=2, vocab_size_per_layer_input=384, hidden_size_per_layer_input=8,
                               laurel_rank=8),
    # the hybrids as their checkpoints are: recurrent layers beside attention ones
    "Lfm2ForCausalLM": dict(layer_types=["conv", "full_attention"], full_attn_idxs=[1]),
    "Lfm2MoeForCausalLM": dict(layer_types=["conv", "full_attention"]),
    "GraniteMoeHybridForCausalLM": dict(layer_types=["mamba", "attention"]),
    "Mamba2ForCausalLM": dict(num_heads=8),
    "BambaForCausalLM": dict(attn_layer_indices=[1]),
    "JambaForCausalLM": dict(attn_layer_period=2, attn_layer_offset=1),
    "JambaForSequenceClassification": dict(attn_layer_period=2, attn_layer_offset=1),
    "Zamba2ForCausalLM": dict(layers_block_type=["linear_attention", "hybrid"], hybrid_layer_ids=[1]),
    # StableLM 2 12B's variant: per-head q/k LayerNorms, parallel residual, q/k/v biases
    "StableLmForCausalLM": dict(qk_layernorm=True, use_parallel_residual=True, use_qkv_bias=True),
}

# Architectures known to fail, with the reason: recorded as xfail (strict, so a fix shows up).
_INLINE = "attention written inline, not through ALL_ATTENTION_FUNCTIONS ({}): no _supports_attention_backend"
KNOWN_FAILURES: dict[str, str] = {
    "BloomForCausalLM": _INLINE.format("ALiBi"),
    "FalconForCausalLM": _INLINE.format("SDPA and ALiBi"),
}

# Architectures that HF itself cannot run from a tiny text-only checkpoint as the test drives it.
NOT_APPLICABLE: dict[str, str] = {}

PROMPTS = ["Hello, my name is", "The capital of France is a city that", "Paged attention keeps keys and values in"]
MAX_TOKENS = 12
SPECIAL_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)


def tiny_config(arch: str, vocab_size: int):
    """The architecture's own config class with every size field made tiny."""
    config_cls = getattr(transformers, arch).config_class
    default = config_cls()
    fields_of = set(default.to_dict())
    alias = getattr(config_cls, "attribute_map", {})
    fields = {alias.get(k, k): v for k, v in TINY.items() if alias.get(k, k) in fields_of}
    if "qk_rope_head_dim" in fields_of:
        fields.update({k: v for k, v in _LATENT.items() if k in fields_of})
    fields.update(vocab_size=vocab_size, architectures=[arch], tie_word_embeddings=False,
                  **{k: v for k, v in SPECIAL_IDS.items() if k in fields_of})
    num_layers = alias.get("num_hidden_layers", "num_hidden_layers")
    layer_types = getattr(default, "layer_types", None)
    if "layer_types" in fields_of and layer_types and len(set(layer_types)) > 1:  # one layer of each kind
        fields["layer_types"] = list(dict.fromkeys(layer_types))
        fields[num_layers] = len(fields["layer_types"])
    fields.update(OVERRIDES.get(arch, {}))
    default_layers = getattr(default, "num_hidden_layers", None)
    for key, value in default.to_dict().items():  # per-layer lists follow the layer count
        if isinstance(value, list) and len(value) == default_layers and key not in fields and num_layers in fields:
            fields[key] = (value * fields[num_layers])[:fields[num_layers]]
    return config_cls(**fields)


def build_checkpoint(path: str, arch: str, tokenizer) -> str:
    config = tiny_config(arch, len(tokenizer))
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _marks(arch: str) -> list:
    if arch in NOT_APPLICABLE:
        return [pytest.mark.skip(reason=f"not applicable: {NOT_APPLICABLE[arch]}")]
    if arch in KNOWN_FAILURES:
        return [pytest.mark.xfail(reason=KNOWN_FAILURES[arch], raises=ValueError, strict=True)]  # refused at load
    return []


@pytest.fixture(scope="module")
def checkpoint_root(tmp_path_factory):
    return tmp_path_factory.mktemp("transformers_backend")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and their spinning costs minutes when the
    cores are shared with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ids_of(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text).input_ids])


def hf_greedy(hf, prompt_ids: list[int]) -> tuple[list[int], list[float]]:
    """HF's greedy continuation (EOS disabled) and the raw logprob of each chosen token."""
    ids = torch.tensor([prompt_ids])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS,
                      min_new_tokens=MAX_TOKENS, eos_token_id=None, pad_token_id=SPECIAL_IDS["pad_token_id"],
                      output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    logprobs = torch.stack(out.logits, 1)[0].float().log_softmax(-1)
    return tokens, [logprobs[i, t].item() for i, t in enumerate(tokens)]


def check_generate(path: str, arch: str) -> None:
    llm = LLM(path, model_impl="transformers", dtype="float32")
    assert llm.apply_model(lambda m: type(m).__name__)[0].startswith("Transformers")
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)  # one batch of different lengths
    hf = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()
    for out in outs:
        ref_tokens, ref_logprobs = hf_greedy(hf, out.prompt_token_ids)
        got = out.outputs[0]
        assert got.token_ids == ref_tokens, f"{arch}: {out.prompt!r}"
        ours = [lp[t].logprob for lp, t in zip(got.logprobs, got.token_ids)]
        torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref_logprobs), atol=1e-4, rtol=0)


def check_pooling(path: str, task: str, arch: str, tokenizer) -> None:
    llm = LLM(path, runner="pooling", convert="reward" if task == "reward" else "auto", model_impl="transformers",
              dtype="float32")
    assert llm.apply_model(lambda m: type(m).__name__)[0].startswith("Transformers")
    hf = getattr(transformers, arch).from_pretrained(path, dtype=torch.float32).eval()
    refs = [hf(ids_of(tokenizer, text)) for text in PROMPTS] if task != "embed" else None
    if task == "embed":
        pooling = llm.llm_engine.pooler_config.pooling_type
        assert pooling in ("CLS", "LAST")
        for text, out in zip(PROMPTS, llm.embed(PROMPTS, use_tqdm=False)):
            hidden = hf.base_model(ids_of(tokenizer, text)).last_hidden_state[0]
            ref = F.normalize(hidden[0 if pooling == "CLS" else -1], dim=-1)
            assert F.cosine_similarity(ref, torch.tensor(out.outputs.embedding), dim=0) >= 0.9999, text
    elif task == "classify":
        for ref, out in zip(refs, llm.classify(PROMPTS, use_tqdm=False)):
            torch.testing.assert_close(torch.tensor(out.outputs.probs), ref.logits[0].softmax(-1), atol=1e-5, rtol=1e-5)
    elif task == "reward":  # the LM head's logits at every token
        for ref, out in zip(refs, llm.reward(PROMPTS, use_tqdm=False)):
            torch.testing.assert_close(out.outputs.data, ref.logits[0], atol=1e-4, rtol=0)
    else:  # token_classify: class probabilities of every token
        for ref, out in zip(refs, llm.encode(PROMPTS, pooling_task="token_classify", use_tqdm=False)):
            torch.testing.assert_close(out.outputs.data, ref.logits[0].softmax(-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task, arch", [pytest.param(t, a, marks=_marks(a), id=f"{t}-{a}") for t, a in CASES])
def test_parity(task, arch, tokenizer, checkpoint_root):
    path = str(checkpoint_root / f"{task}-{arch}")
    build_checkpoint(path, arch, tokenizer)
    if task == "generate":
        check_generate(path, arch)
    else:
        check_pooling(path, task, arch, tokenizer)


@pytest.mark.parametrize("arch, layers", [
    ("DeepseekV3ForCausalLM", [(4, 24, 16)] * 2),  # latent attention: keys 16 + 8 rotary wide, values 16
    ("GPTBigCodeForCausalLM", [(1, 16, 16)] * 2),  # multi-query
    ("GraniteMoeForCausalLM", [(2, 16, 16)] * 2),
])
def test_kv_cache_is_laid_out_from_what_the_attention_calls_get(arch, layers, tokenizer, checkpoint_root):
    path = build_checkpoint(str(checkpoint_root / f"layout-{arch}"), arch, tokenizer)
    assert LLM(path, model_impl="transformers").apply_model(lambda m: m.kv_cache_layers()) == [layers]


# ---------------------------------------------------------------- recurrent-state models (per sequence)

@pytest.fixture(scope="module")
def mamba_path(tokenizer, checkpoint_root):
    return build_checkpoint(str(checkpoint_root / "state-Mamba"), "MambaForCausalLM", tokenizer)


def test_recurrent_model_batched_gives_each_alone(mamba_path):
    llm = LLM(mamba_path, model_impl="transformers", max_num_seqs=4)
    engine = llm.llm_engine
    assert llm.apply_model(lambda m: type(m).__name__) == ["TransformersRecurrentForCausalLM"]
    assert not engine.block_manager.enable_prefix_caching and not engine.scheduler.enable_chunked_prefill
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    batched = llm.generate(PROMPTS[:2], params, use_tqdm=False)  # prompts of different lengths
    assert len({len(o.prompt_token_ids) for o in batched}) == 2
    for out in batched:
        alone = llm.generate(out.prompt, params, use_tqdm=False)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids, out.prompt
    assert engine.scheduler.state_slots.num_free == 4


def test_recurrent_state_slots_are_freed_on_preemption_and_abort(mamba_path):
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in LLM(mamba_path).generate(PROMPTS, params, use_tqdm=False)]
    # 8 blocks of 4 tokens: enough for any one request, not for the three at once
    tight = LLM(mamba_path, block_size=4, num_gpu_blocks_override=8, max_model_len=32, max_num_seqs=3)
    engine = tight.llm_engine
    assert [o.outputs[0].token_ids for o in tight.generate(PROMPTS, params, use_tqdm=False)] == want
    assert engine.scheduler.num_preemptions > 0  # a preempted request recomputed from a fresh state
    assert engine.scheduler.state_slots.num_free == 3
    for rid, prompt in zip("abc", PROMPTS):
        engine.add_request(rid, prompt, params)
    engine.step()
    assert engine.scheduler.state_slots.num_free < 3
    engine.abort_request(["a", "b", "c"])
    assert engine.scheduler.state_slots.num_free == 3 and not engine.has_unfinished_requests()
    assert all(state is None for state in engine.scheduler.state_slots.states)


# ---------------------------------------------------------------- custom models (auto_map, trust_remote_code)

TOY_CONFIG = '''
from transformers import PretrainedConfig


class ToyConfig(PretrainedConfig):
    model_type = "kiln_toy"
    base_model_tp_plan = {"layers.*.qkv": "colwise", "layers.*.o": "rowwise"}
    base_model_pp_plan = {"embed": (["input_ids"], ["inputs_embeds"]), "layers": (["hidden_states"], ["hidden_states"])}

    def __init__(self, vocab_size=384, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512, **kwargs):
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)
'''

# A model written as the supported-models page asks: attention through ALL_ATTENTION_FUNCTIONS,
# kwargs passed down, `_supports_attention_backend = True` (or not, for the refusal test).
TOY_MODELING = '''
import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, CausalLMOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_toy import ToyConfig


class ToyAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx, self.is_causal = config, layer_idx, True
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.num_key_value_groups = self.heads // self.kv_heads
        self.head_dim = config.hidden_size // self.heads
        self.qkv = nn.Linear(config.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim)
        self.o = nn.Linear(self.heads * self.head_dim, config.hidden_size)

    def forward(self, hidden_states, **kwargs):
        b, t, _ = hidden_states.shape
        q, k, v = self.qkv(hidden_states).split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], -1)
        q, k, v = (x.view(b, t, -1, self.head_dim).transpose(1, 2) for x in (q, k, v))
        attention = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        out, _ = attention(self, q, k, v, None, scaling=self.head_dim ** -0.5, **kwargs)
        return self.o(out.reshape(b, t, -1))


class ToyLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(config.hidden_size), nn.LayerNorm(config.hidden_size)
        self.attn = ToyAttention(config, layer_idx)
        self.mlp = nn.Sequential(nn.Linear(config.hidden_size, 128), nn.GELU(), nn.Linear(128, config.hidden_size))

    def forward(self, hidden_states, **kwargs):
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), **kwargs)
        return hidden_states + self.mlp(self.norm2(hidden_states))


class ToyPreTrainedModel(PreTrainedModel):
    config_class = ToyConfig
    base_model_prefix = "model"
    _supports_sdpa = True
    _supports_attention_backend = SUPPORTS_BACKEND


class ToyModel(ToyPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(ToyLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.post_init()

    def forward(self, input_ids, position_ids=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("attention_mask", "use_cache", "return_dict")}
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        hidden_states = self.embed(input_ids) + self.pos(position_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        return BaseModelOutput(last_hidden_state=self.norm(hidden_states))


class ToyForCausalLM(ToyPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = ToyModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids, **kwargs):
        return CausalLMOutput(logits=self.lm_head(self.model(input_ids, **kwargs).last_hidden_state))
'''

TOY_AUTO_MAP = {"AutoConfig": "configuration_toy.ToyConfig", "AutoModel": "modeling_toy.ToyModel",
                "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM"}


def write_toy_model(path: str, tokenizer, supports_backend: bool = True) -> str:
    """A custom model directory: its own config and modeling files, named by auto_map, and random
    weights built from those files."""
    from transformers import AutoModelForCausalLM

    os.makedirs(path, exist_ok=True)
    files = {"configuration_toy.py": TOY_CONFIG,
             "modeling_toy.py": TOY_MODELING.replace("SUPPORTS_BACKEND", str(supports_backend)),
             "config.json": json.dumps({"model_type": "kiln_toy", "architectures": ["ToyForCausalLM"],
                                        "auto_map": TOY_AUTO_MAP, "vocab_size": len(tokenizer), **SPECIAL_IDS})}
    for name, text in files.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path, trust_remote_code=True),
                                             trust_remote_code=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def manual_greedy(hf, prompt_ids: list[int], steps: int) -> list[int]:
    """Greedy decoding by whole-sequence forwards (the toy model keeps no cache of its own)."""
    ids = list(prompt_ids)
    for _ in range(steps):
        ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_custom_model_loads_with_trust_remote_code(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    path = write_toy_model(str(tmp_path / "toy"), tokenizer)
    llm = LLM(path, model_impl="transformers", trust_remote_code=True)
    assert llm.apply_model(lambda m: type(m).__name__) == ["TransformersForCausalLM"]
    assert llm.apply_model(lambda m: m.base_model_tp_plan) == [{"layers.*.qkv": "colwise", "layers.*.o": "rowwise"}]
    assert llm.apply_model(lambda m: sorted(m.base_model_pp_plan)) == [["embed", "layers"]]
    hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="sdpa").eval()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for out in llm.generate(PROMPTS, params, use_tqdm=False):
        assert out.outputs[0].token_ids == manual_greedy(hf, out.prompt_token_ids, MAX_TOKENS), out.prompt
    # model_impl="auto" finds no native implementation and falls back to the backend
    assert LLM(path, trust_remote_code=True).apply_model(lambda m: type(m).__name__)[0].startswith("Transformers")


def test_custom_model_is_refused_without_trust_remote_code(tmp_path, tokenizer):
    path = write_toy_model(str(tmp_path / "toy"), tokenizer)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        LLM(path, model_impl="transformers")


def test_custom_model_without_backend_support_is_refused(tmp_path, tokenizer):
    # its own directory name: transformers caches remote code by it within a process
    path = write_toy_model(str(tmp_path / "toy_unsupported"), tokenizer, supports_backend=False)
    with pytest.raises(ValueError, match="ToyForCausalLM.*lacks `_supports_attention_backend = True`"):
        LLM(path, model_impl="transformers", trust_remote_code=True)


# ---------------------------------------------------------------- the native families through the backend

NATIVE = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


@pytest.mark.parametrize("arch", NATIVE)
def test_native_families_give_the_same_tokens_through_the_backend(arch, checkpoints):
    path = checkpoints[arch]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    native = LLM(path, model_impl="kiln")
    backend = LLM(path, model_impl="transformers")
    assert not native.apply_model(lambda m: type(m).__name__)[0].startswith("Transformers")
    assert backend.apply_model(lambda m: type(m).__name__) == ["TransformersForCausalLM"]
    assert backend.apply_model(lambda m: m.base_model_tp_plan) == [AutoConfig.from_pretrained(path).base_model_tp_plan]
    assert backend.apply_model(lambda m: m.base_model_tp_plan)[0], "the family's config has a TP plan"
    theirs = backend.generate(PROMPTS, params, use_tqdm=False)
    for a, b in zip(native.generate(PROMPTS, params, use_tqdm=False), theirs):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, a.prompt


# ---------------------------------------------------------------- async scheduling (the default on CUDA)

@pytest.mark.parametrize("arch", ["GPT2LMHeadModel", "MambaForCausalLM", "JambaForCausalLM", "MixtralForCausalLM"])
def test_async_scheduling_gives_the_steps_in_turn_outputs(arch, tokenizer, checkpoint_root):
    """On CUDA every model runs with async scheduling unless told otherwise: through the backend
    too — plain attention, recurrent state (per sequence), a hybrid of both, a mixture of experts —
    it gives the synchronous engine's tokens, greedy, seeded sampling and a stop string alike."""
    path = build_checkpoint(str(checkpoint_root / f"async-{arch}"), arch, tokenizer)
    params = [SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=9, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, stop=["e"])]
    outs = [[[c.token_ids for c in o.outputs]
             for o in LLM(path, model_impl="transformers", async_scheduling=overlap, max_num_seqs=4).generate(
                 PROMPTS, params, use_tqdm=False)] for overlap in (False, True)]
    assert outs[0] == outs[1]


# ---------------------------------------------------------------- the compiled path

@pytest.mark.parametrize("arch", ["DeepseekV3ForCausalLM", "GptOssForCausalLM"])
def test_compiled_backend_matches_eager(arch, tokenizer, checkpoint_root):
    """The HF graph traced through kiln's compiler (passes and Inductor) gives the eager tokens:
    latent attention (value head dim, a query filled in place) and attention sinks."""
    path = build_checkpoint(str(checkpoint_root / f"compiled-{arch}"), arch, tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=0)
    eager = LLM(path, model_impl="transformers", enforce_eager=True).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(path, model_impl="transformers", enforce_eager=False)
    assert llm.llm_engine.compiled
    for a, b in zip(eager, llm.generate(PROMPTS, params, use_tqdm=False)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids, a.prompt
        torch.testing.assert_close(chosen_logprobs(b.outputs[0]), chosen_logprobs(a.outputs[0]), atol=1e-4, rtol=0)


def chosen_logprobs(completion) -> torch.Tensor:
    return torch.tensor([lp[t].logprob for lp, t in zip(completion.logprobs, completion.token_ids)])
