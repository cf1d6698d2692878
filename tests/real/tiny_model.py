"""A tiny random-weight llama model in GGUF, written at test time (no download).

Architecture `llama` (2 layers, 64-wide, 4 heads), ~450 KB. The vocabulary is byte-level
over ASCII with SentencePiece rules (llama.cpp's `llama` tokenizer): `<unk>`, `<s>`,
`</s>`, the 128 ASCII byte tokens `<0x00>`..`<0x7F>` (byte fallback for any ASCII text,
as llama.cpp's SPM tokenizer needs) and one normal token per printable character plus
`▁` (SentencePiece's space). Key names follow gguf-py's `GGUFWriter` (gguf/constants.py)
and llama.cpp's llama loader (src/llama-model.cpp, LLM_ARCH_LLAMA).

The output projection has zero rows for every special and byte token and large random
rows for printable ones: a greedy (temperature 0) decode then always picks printable
text, never end-of-stream or a control byte, so every generated token is one visible
piece of text and `max_tokens` is always reached (finish_reason "length").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

N_EMBD = 64
N_HEAD = 4
N_LAYER = 2
N_FF = 128
N_CTX = 512

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(128)]
PRINTABLE = [chr(c) for c in range(0x21, 0x7F)] + ["\u2581"]


def vocabulary() -> tuple[list[str], list[int]]:
    import gguf

    tokens = SPECIALS + BYTES + PRINTABLE
    types = (
        [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
        + [gguf.TokenType.BYTE] * len(BYTES)
        + [gguf.TokenType.NORMAL] * len(PRINTABLE)
    )
    return tokens, [int(t) for t in types]


def write_tiny_llama(path: Path, seed: int = 1234) -> Path:
    import gguf

    rng = np.random.default_rng(seed)
    tokens, types = vocabulary()
    n_vocab = len(tokens)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("carbon-proxy-tiny-llama")
    writer.add_context_length(N_CTX)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_rope_dimension_count(N_EMBD // N_HEAD)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 3 + [0.0] * len(BYTES) + [-1.0] * len(PRINTABLE))
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    def weight(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(n_vocab, N_EMBD, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(N_EMBD, dtype=np.float32))
    output = weight(n_vocab, N_EMBD, scale=4.0)
    output[: len(SPECIALS) + len(BYTES)] = 0.0  # never chosen greedily: see the module doc
    writer.add_tensor("output.weight", output)
    for layer in range(N_LAYER):
        prefix = f"blk.{layer}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(prefix + "attn_q.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(prefix + "attn_k.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(prefix + "attn_v.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(prefix + "attn_output.weight", weight(N_EMBD, N_EMBD))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(N_EMBD, dtype=np.float32))
        writer.add_tensor(prefix + "ffn_gate.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(prefix + "ffn_up.weight", weight(N_FF, N_EMBD))
        writer.add_tensor(prefix + "ffn_down.weight", weight(N_EMBD, N_FF))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
