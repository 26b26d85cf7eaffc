"""Tiny local checkpoints: a byte-level BPE tokenizer trained here and a randomly initialised
model saved with `save_pretrained`. The demo (`kiln generate --demo`) and the tests use them, so
nothing is ever downloaded."""

from __future__ import annotations

import os

_CORPUS = """\
Hello, my name is Kiln and I serve language models. The capital of France is Paris.
The quick brown fox jumps over the lazy dog. A compiler turns programs into fast kernels.
Once upon a time there was a small engine that learned to batch requests together.
Paged attention keeps keys and values in fixed-size blocks so that memory is never wasted.
The weather today is sunny with a light breeze from the west, and the sea is calm.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Questions? Answers! Lists; tuples: dicts.
"""

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(vocab_size: int = 384):
    """A small byte-level BPE tokenizer as a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def train_wordpiece_tokenizer(vocab_size: int = 256):
    """A small BERT-style WordPiece tokenizer ([CLS] a [SEP] b [SEP], with token type ids)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                             cls_token="[CLS]", mask_token="[MASK]")


WHISPER_LANGUAGES = ("en", "de", "fr", "es")


def train_whisper_tokenizer():
    """A byte-level BPE tokenizer with Whisper's special tokens: <|endoftext|>, <|startoftranscript|>,
    language tokens, <|translate|>, <|transcribe|>, <|notimestamps|> and the 1501 timestamps
    <|0.00|> .. <|30.00|> (last, so every id from <|0.00|> up is a timestamp, as in Whisper)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{lang}|>" for lang in WHISPER_LANGUAGES]
                + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>",
                   "<|notimestamps|>"])
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])
    return fast


def build_whisper_checkpoint(path: str, seed: int = 0, tokenizer=None, **overrides) -> str:
    """A tiny random WhisperForConditionalGeneration (80 mel bins, the real 30-second window)."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    tokenizer = tokenizer or train_whisper_tokenizer()
    fields = dict(vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=80,
                  max_source_positions=1500, max_target_positions=128, init_std=0.2,
                  decoder_start_token_id=tokenizer.convert_tokens_to_ids("<|startoftranscript|>"),
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.eos_token_id, architectures=["WhisperForConditionalGeneration"])
    fields.update(overrides)
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(WhisperConfig(**fields))
    model.generation_config.forced_decoder_ids = None
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    from transformers import WhisperFeatureExtractor

    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


def tiny_config(architecture: str = "LlamaForCausalLM", vocab_size: int = 384, **overrides):
    """A shrunk HF config of one of the served families."""
    from transformers import AutoConfig

    model_type = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                  "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "FalconForCausalLM": "falcon",
                  "BloomForCausalLM": "bloom"}[architecture]
    fields = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                  tie_word_embeddings=False, architectures=[architecture])
    if architecture == "Qwen3ForCausalLM":
        fields["head_dim"] = 16
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def build_checkpoint(path: str, architecture: str = "LlamaForCausalLM", seed: int = 0, dtype: str = "float32",
                     tokenizer=None, **config_overrides) -> str:
    """Write a randomly initialised tiny model and a trained tokenizer to `path`."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or train_tokenizer()
    config = tiny_config(architecture, **{"vocab_size": len(tokenizer), **config_overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def demo_checkpoint() -> str:
    """The demo model, built once under ~/.cache/kiln (or $KILN_CACHE_DIR)."""
    root = os.environ.get("KILN_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    path = os.path.join(root, "demo-llama")
    if not os.path.isfile(os.path.join(path, "config.json")):
        build_checkpoint(path, "LlamaForCausalLM")
    return path
