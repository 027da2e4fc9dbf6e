"""A merged Llama-family model as one GGUF file for llama.cpp and Ollama (`rlhf export format=gguf`).

    write_gguf(model, tokenizer, path, "q8_0", pre="smollm", name="my-dpo")

Written with the `gguf` package the way llama.cpp's convert_hf_to_gguf.py writes the Llama
family: its tensor names, the q/k rows permuted for llama.cpp's rotary layout, RMS norms in
float32, the byte-level BPE tokenizer as `tokenizer.ggml.*` with its chat template, and Llama 3's
rope scaling as a `rope_freqs` tensor. Weights are f16 or q8_0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from rlhf_cli.schema import UserError

GGUF_ARCHITECTURES = ("llama", "mistral")  # model_type -> llama.cpp's "llama" graph
# llama.cpp picks its pre-tokenizer (how text is split before BPE) by name; the base models whose
# name we know, by prefix of the base model's name (other bases: gguf.pre=NAME)
KNOWN_PRE = {
    "embedded:smollm2": "smollm",
    "HuggingFaceTB/SmolLM2": "smollm",
    "meta-llama/Llama-3": "llama-bpe",
    "meta-llama/Meta-Llama-3": "llama-bpe",
}
TENSOR_NAMES = {  # HF name inside model.layers.N -> llama.cpp's name inside blk.N
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# gguf.TokenType values
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def check_gguf(model_config, tokenizer, base_model: str, pre: str) -> str:
    """One sentence for a model this writer cannot write; returns the pre-tokenizer's name."""
    kind = getattr(model_config, "model_type", "?")
    if kind not in GGUF_ARCHITECTURES:
        raise UserError(
            f"format=gguf writes the Llama family ({', '.join(GGUF_ARCHITECTURES)}), not {kind}; "
            "export format=hf and convert that folder with llama.cpp's convert_hf_to_gguf.py."
        )
    if json.loads(tokenizer.backend_tokenizer.to_str())["model"]["type"] != "BPE":
        raise UserError(
            "format=gguf writes byte-level BPE tokenizers (Llama 3, SmolLM2), not this model's "
            "SentencePiece one; export format=hf and convert it with llama.cpp's "
            "convert_hf_to_gguf.py."
        )
    if pre != "auto":
        return pre
    known = next(
        (name for prefix, name in KNOWN_PRE.items() if base_model.startswith(prefix)), None
    )
    if known is None:
        raise UserError(
            f"gguf.pre=auto does not know the pre-tokenizer llama.cpp uses for {base_model}; set "
            "gguf.pre=NAME (llama-bpe for Llama 3, smollm for SmolLM2; llama.cpp's "
            "convert_hf_to_gguf.py names the others)."
        )
    return known


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows from transformers' rotary layout (halves) to llama.cpp's (interleaved pairs)."""
    rows = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, rows, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_factors(config) -> np.ndarray | None:
    """Llama 3.1's rope scaling as llama.cpp reads it: one factor per rotary frequency."""
    scaling = (
        getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
    )
    if scaling.get("rope_type") != "llama3":
        return None
    base = scaling.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    factors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * base ** (i / dim)
        if wavelength < context / high:
            factors.append(1.0)
        elif wavelength > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, their llama.cpp types, merges) of a byte-level BPE tokenizer; ids past the
    tokenizer's (a padded embedding) are unused placeholders."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()}
    types = dict.fromkeys(by_id, NORMAL)
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    kinds = [types.get(i, UNUSED) for i in range(vocab_size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return tokens, kinds, merges


def write_gguf(model, tokenizer, path: Path, kind: str, pre: str, name: str) -> None:
    """The merged causal LM `model` (float weights) and its tokenizer as one GGUF file."""
    import gguf

    config = model.config
    quant = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[kind]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    state = dict(model.state_dict())  # tensors are converted one at a time, as they are added
    vocab_size = state["model.embed_tokens.weight"].shape[0]
    rope = getattr(config, "rope_parameters", None) or {}

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(
        gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    )
    tokens, kinds, merges = _tokens(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    writer.add_token_merges(merges)
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{'unk' if role == 'unk' else role}_token_id")(token_id)
    starts_with_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [
        tokenizer.bos_token_id
    ]
    writer.add_add_bos_token(starts_with_bos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)

    def add(gguf_name: str, tensor: torch.Tensor) -> None:
        weight = tensor.detach().to(torch.float32).cpu().numpy()
        if weight.ndim == 1:  # norms stay float32, as llama.cpp keeps them
            writer.add_tensor(gguf_name, weight.astype(np.float32))
        elif quant == gguf.GGMLQuantizationType.F16 or weight.shape[-1] % 32:
            writer.add_tensor(gguf_name, weight.astype(np.float16))
        else:
            data = gguf.quants.quantize(weight.astype(np.float32), quant)
            writer.add_tensor(gguf_name, data, raw_dtype=quant)

    add("token_embd.weight", state.pop("model.embed_tokens.weight"))
    factors = _rope_factors(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors)
    for layer in range(config.num_hidden_layers):
        for hf, short in TENSOR_NAMES.items():
            weight = state.pop(f"model.layers.{layer}.{hf}.weight")
            if short in ("attn_q", "attn_k"):
                weight = torch.from_numpy(
                    _permute(
                        weight.detach().float().cpu().numpy(),
                        heads if short == "attn_q" else kv_heads,
                    )
                )
            add(f"blk.{layer}.{short}.weight", weight)
    add("output_norm.weight", state.pop("model.norm.weight"))
    head = state.pop("lm_head.weight", None)
    if head is not None and not getattr(config, "tie_word_embeddings", False):
        add("output.weight", head)
    leftover = [k for k in state if "rotary_emb" not in k]
    if leftover:
        raise UserError(
            f"format=gguf has no place for {leftover[0]} (a bias or another part the Llama layout "
            "lacks); export format=hf and convert it with llama.cpp's convert_hf_to_gguf.py."
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
