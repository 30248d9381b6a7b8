"""FLOPs per token and MFU (docs/design.md, "Performance yardsticks")."""

from __future__ import annotations

# Dense bf16 peak FLOP/s by device-name substring (vendor datasheets). CPUs: unknown, no MFU reported.
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "B200": 2250e12, "GH200": 989e12}


def peak_flops(device_name: str) -> float | None:
    for key, value in sorted(PEAK_BF16.items(), key=lambda kv: -len(kv[0])):
        if key in device_name:
            return value
    return None


def non_embedding_params(model) -> int:
    """Parameters that do matmul work per token: everything but the input embedding table."""
    emb = model.get_input_embeddings().weight
    return sum(p.numel() if not hasattr(p, "ds_numel") else p.ds_numel
               for p in model.parameters() if p is not emb)


def train_flops(n_params: int, num_layers: int, num_heads: int, head_dim: int, seq_lengths: list[int]) -> float:
    """Forward+backward FLOPs for packed segments: 6*N per token + 12*L*H*Q*s per token of a segment of length s
    (attention is per segment, so the sum is 12*L*H*Q*sum(s_i^2))."""
    tokens = sum(seq_lengths)
    return 6.0 * n_params * tokens + 12.0 * num_layers * num_heads * head_dim * sum(s * s for s in seq_lengths)


def model_shape(config) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads, head_dim
