"""Tiny random models built from configs, one per row of the architecture table (no downloads)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers as T

VOCAB = 64

_BUILDERS: dict[str, Callable[[], Any]] = {
    "bert": lambda: T.BertForSequenceClassification(
        T.BertConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
            max_position_embeddings=64,
        )
    ),
    "roberta": lambda: T.RobertaForSequenceClassification(
        T.RobertaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
            max_position_embeddings=70,
            pad_token_id=1,
        )
    ),
    "distilbert": lambda: T.DistilBertForSequenceClassification(
        T.DistilBertConfig(
            vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=2, max_position_embeddings=64
        )
    ),
    "gpt2": lambda: T.GPT2LMHeadModel(
        T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    ),
    "llama": lambda: T.LlamaForCausalLM(
        T.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),
    "qwen2": lambda: T.Qwen2ForCausalLM(
        T.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),
    "mistral": lambda: T.MistralForCausalLM(
        T.MistralConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ),
    "bart": lambda: T.BartForConditionalGeneration(
        T.BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=1,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=64,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        )
    ),
    "t5": lambda: T.T5ForConditionalGeneration(
        T.T5Config(
            vocab_size=VOCAB,
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=1,
            num_decoder_layers=2,
            num_heads=2,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    ),
}

ARCHS = sorted(_BUILDERS)


def tiny_model(model_type: str, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = _BUILDERS[model_type]()
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def byte_tokenizer() -> T.PreTrainedTokenizerFast:
    """Byte-level BPE with no merges: every byte is one token, so any text (newlines included)
    round-trips exactly; <pad> and <eos> on top. Built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<pad>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def tiny_llama_dir(directory: Any, chat_template: str | None = None, seed: int = 0) -> Any:
    """A tiny random Llama with the byte tokenizer saved in `directory` (load_base reads it as a
    generator); `chat_template` gives its tokenizer one. Returns the directory."""
    tok = byte_tokenizer()
    if chat_template is not None:
        tok.chat_template = chat_template
    torch.manual_seed(seed)
    config = T.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    T.LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
