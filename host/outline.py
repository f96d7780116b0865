"""A model's shape from its configuration alone (no weights loaded), so the commands can check
their arguments against it (top-k, layers, ranks, context) before any expensive step."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ndpmoe.model.errors import NdpmoeError


@dataclass(frozen=True)
class ModelOutline:
    num_layers: int
    moe_layers: tuple[int, ...]      # layers whose MLP is (or, for the default model, can be made) an MoE block
    experts: int
    top_k: int
    hidden: int
    intermediate: int                # of one routed expert
    max_positions: int


def model_outline(model: str) -> ModelOutline:
    """'default' (the MoEfied SmolLM2), a Hugging Face checkpoint folder or a .gguf file."""
    if model == "default":
        from ndpmoe.model import smollm
        from ndpmoe.model.default_moe import DEFAULT_CONFIG as c

        return ModelOutline(smollm.NUM_LAYERS, tuple(range(smollm.NUM_LAYERS)), c.num_experts, c.top_k,
                            smollm.HIDDEN, c.expert_size, smollm.MAX_POSITIONS)
    path = Path(model)
    if path.is_dir():
        from ndpmoe.model.checkpoint import Checkpoint

        ckpt = Checkpoint(path)
        positions = ckpt.config.get("max_position_embeddings")
    elif path.suffix == ".gguf" and path.is_file():
        from ndpmoe.model.gguf_reader import GGUFCheckpoint

        ckpt = GGUFCheckpoint(path)
        positions = ckpt._meta("context_length")
    else:
        raise NdpmoeError(f"--model must be 'default', a checkpoint folder or a .gguf file, not {model!r}")
    top_k = ckpt.router_config().top_k
    if top_k > ckpt.num_experts:
        raise NdpmoeError(f"{model}: routes top-{top_k} of only {ckpt.num_experts} experts")
    positions = int(positions) if isinstance(positions, int) and positions > 0 else 1 << 30
    return ModelOutline(ckpt.num_layers, tuple(ckpt.moe_layers), ckpt.num_experts, top_k, ckpt.hidden,
                        ckpt.expert_intermediate, positions)


def layer_list(values) -> str:
    """`0..29` for a run of layers, else the values, comma-separated."""
    values = sorted(values)
    if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values)) or "none"
