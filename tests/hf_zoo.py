"""Tiny random-init Hugging Face models, the oracle for model parity and conversion tests."""

from pathlib import Path

import torch
import transformers

VOCAB = 250  # not a multiple of 128: exercises vocabulary padding


def hf_config(name: str) -> transformers.PretrainedConfig:
    if name == "llama":  # GQA with 2 KV heads, untied
        return transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
        )
    if name == "llama_tied_rope_scaled":
        return transformers.LlamaConfig(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            rope_theta=50000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        )
    if name == "qwen2":  # q/k/v biases, tied
        return transformers.Qwen2Config(
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            use_sliding_window=False,
        )
    if name == "opt":
        return transformers.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
        )
    if name == "gpt2":
        return transformers.GPT2Config(
            n_embd=64,
            n_layer=4,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    raise KeyError(name)


def hf_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """The same random weights on every rank that calls it with the same seed."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(name), attn_implementation="eager")
    with torch.no_grad():  # HF inits norms to (1, 0) and biases to 0: randomise so they are tested
        for n, p in model.named_parameters():
            if "norm" in n or "ln_" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.float().eval()


def llama_with_tokenizer(
    out: Path,
    seed: int,
    tokenizer_dir: Path,
    layers: int = 4,
    context: int = 64,
    sharpen: float = 6.0,
    kv_heads: int = 2,
) -> Path:
    """An HF directory: a tiny LLaMA with the tokenizer's vocabulary, its output layer scaled by
    ``sharpen`` (peaked next-token distributions), and the tokenizer."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=context,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpen)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
