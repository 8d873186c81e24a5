"""Tiny random transformers models of the GPT-2, Llama and BERT families, built locally."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 100


def gpt2_lm(num_layers: int = 5) -> tf.GPT2LMHeadModel:
    config = tf.GPT2Config(n_layer=num_layers, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2)
    return tf.GPT2LMHeadModel(config).eval()


def llama_lm(num_layers: int = 5, tie: bool = False) -> tf.LlamaForCausalLM:
    config = tf.LlamaConfig(
        num_hidden_layers=num_layers,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=0,
    )
    return tf.LlamaForCausalLM(config).eval()


def bert_config(num_layers: int = 4, **kwargs) -> tf.BertConfig:
    return tf.BertConfig(
        num_hidden_layers=num_layers, hidden_size=32, intermediate_size=64, num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=64, **kwargs
    )


def bert_encoder(num_layers: int = 4) -> tf.BertModel:
    return tf.BertModel(bert_config(num_layers)).eval()


def bert_classifier(num_layers: int = 4) -> tf.BertForSequenceClassification:
    return tf.BertForSequenceClassification(bert_config(num_layers, num_labels=3)).eval()


def llama_classifier(num_layers: int = 3) -> tf.LlamaForSequenceClassification:
    config = tf.LlamaConfig(
        num_hidden_layers=num_layers, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, pad_token_id=0, num_labels=3,
    )
    return tf.LlamaForSequenceClassification(config).eval()


def padded_batch(batch: int = 3, length: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids with right padding (id 0) in two of the rows, and the attention mask."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, length - 3 :] = 0
    attention_mask[2, length // 2 :] = 0
    input_ids[attention_mask == 0] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}
