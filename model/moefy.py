"""MoEfication: turn a dense SwiGLU MLP into an MoE block (`MoEWeights`) and fit its router.

Legend: N calibration tokens, D hidden, I dense intermediate, E routed experts, G expert size,
S shared size, K top-k.

Recipe (each step measured, see the table in model/README.md):
1. Neuron contribution a[t, i] = |h[t, i]| * ||w2[:, i]||, h = silu(x w1^T) * (x w3^T): how much
   neuron i adds to the block output for token t.
2. Shared expert: the S neurons with the largest mean a^2 (DeepSeek-style always-on expert).
   SwiGLU neurons are not sparse, and in SmolLM2 a sixth of them carries 40-60% of the energy.
3. Routed experts: the rest split into E equal groups of G neurons by balanced spherical k-means on
   their contribution patterns over the calibration tokens (neurons that fire on the same tokens
   share an expert).
4. Router [E, D]: linear, trained with a cross-entropy against each token's expert-energy
   distribution (which experts matter most for this token), not least squares to activations.
5. Combination: RouterConfig(norm_topk_prob=True, routed_scaling_factor=K) and a router scale
   (temperature) picked on calibration data, so the K selected experts are summed with weights
   near 1 as in the dense MLP while the order of the weights still ranks the experts (Top-n).
6. Short calibration of the experts: the down projections (w2, all experts and the shared one)
   are refitted by ridge regression to the dense block output under the router's own selections,
   so the kept neurons absorb part of what the dropped ones contributed.
7. Layer by layer (`moefy_model`): each layer is fitted on the inputs the MoEfied layers before it give.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .moe import MoEWeights, RouterConfig, route

GROUP = 64     # quantization groups run along the input dim; w2's input dim is the expert size


@dataclass(frozen=True)
class MoEfyConfig:
    """How a dense MLP is cut into experts. The defaults are the project's default model."""
    num_experts: int = 16
    expert_size: int = 64
    shared_size: int = 512
    top_k: int = 8
    calib_tokens: int = 8192
    cluster_iters: int = 15
    router_steps: int = 60
    router_target: str = "energy"        # "energy": soft energy share; "topk": oracle top-k set
    refit_down: bool = True
    ridge: float = 0.1                   # refit pull toward the original w2, relative to the Gram diagonal
    seed: int = 0

    def __post_init__(self):
        for name in ("num_experts", "expert_size", "top_k", "calib_tokens", "cluster_iters", "router_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, not {v!r}")
        if self.expert_size % GROUP:
            raise ValueError(f"expert_size must be a multiple of {GROUP} (quantization group), not {self.expert_size}")
        if not isinstance(self.shared_size, int) or self.shared_size < 0 or self.shared_size % GROUP:
            raise ValueError(f"shared_size must be 0 or a positive multiple of {GROUP}, not {self.shared_size!r}")
        if self.top_k >= self.num_experts:
            raise ValueError(f"top_k must be below num_experts={self.num_experts}, not {self.top_k}")
        if self.router_target not in ("energy", "topk"):
            raise ValueError(f"router_target must be 'energy' or 'topk', not {self.router_target!r}")

    @property
    def intermediate(self) -> int:
        """Dense intermediate size this configuration partitions."""
        return self.num_experts * self.expert_size + self.shared_size

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def tag(self) -> str:
        return f"E{self.num_experts}x{self.expert_size}-S{self.shared_size}-k{self.top_k}"

    def digest(self) -> str:
        import hashlib
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def hidden_acts(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """SwiGLU hidden activations h [N, I] of inputs x [N, D]."""
    return F.silu(x @ w1.t()) * (x @ w3.t())


def pick_shared(a: torch.Tensor, size: int) -> torch.Tensor:
    """Ids of the `size` neurons with the largest mean squared contribution (sorted ids)."""
    if size == 0:
        return torch.empty(0, dtype=torch.long)
    return a.pow(2).mean(0).topk(size).indices.sort().values


def balanced_assign(score: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each row of score [n, E] (higher is better) to a column, at most `capacity` per column,
    greedily from the best (row, column) pair down. Returns [n] column ids."""
    n, e = score.shape
    if n > e * capacity:
        raise ValueError(f"{n} items do not fit {e} groups of {capacity}")
    owner = [-1] * n
    count = [0] * e
    left = n
    for flat in torch.argsort(score.flatten(), descending=True).tolist():
        i, c = divmod(flat, e)
        if owner[i] < 0 and count[c] < capacity:
            owner[i] = c
            count[c] += 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(owner, dtype=torch.long)


def cluster_neurons(a: torch.Tensor, num_experts: int, iters: int, seed: int) -> torch.Tensor:
    """Balanced spherical k-means of neurons by their contribution pattern a [N, n] over tokens.
    Returns [n] expert ids, exactly n // num_experts neurons per expert."""
    feat = F.normalize(a.t(), dim=1)                               # [n, N]
    n = feat.shape[0]
    gen = torch.Generator().manual_seed(seed)
    cent = feat[torch.randperm(n, generator=gen)[:num_experts]]
    owner = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        owner = balanced_assign(feat @ cent.t(), n // num_experts)
        cent = F.normalize(torch.zeros(num_experts, feat.shape[1]).index_add_(0, owner, feat), dim=1)
    return owner


def expert_energy(h: torch.Tensor, w2: torch.Tensor, groups: list[torch.Tensor]) -> torch.Tensor:
    """Squared norm of each expert's output per token: [N, E]."""
    return torch.stack([(h[:, g] @ w2[:, g].t()).pow(2).sum(1) for g in groups], 1)


def fit_router(x: torch.Tensor, energy: torch.Tensor, k: int, steps: int, target: str, seed: int) -> torch.Tensor:
    """Linear router [E, D] trained with a cross-entropy against the per-token expert-energy share
    ("energy") or the uniform distribution over the oracle top-k ("topk").

    Warm start: ridge regression of the centred log-energy (closed form), then full-batch Adam."""
    torch.manual_seed(seed)
    if target == "energy":
        p = energy / energy.sum(1, keepdim=True).clamp_min(1e-30)
    else:
        p = torch.zeros_like(energy).scatter_(1, energy.topk(k, dim=1).indices, 1.0 / k)
    log_e = energy.clamp_min(1e-30).log()
    log_e = log_e - log_e.mean(1, keepdim=True)
    gram = x.t() @ x
    r0 = torch.linalg.solve(gram + 1e-3 * gram.diagonal().mean() * torch.eye(x.shape[1]), x.t() @ log_e).t()
    # Adam by hand: the gradient of the mean cross-entropy is (softmax - p)^T x / N, and
    # torch.optim would import torch._dynamo (15 s on these machines) for one small matrix.
    r, m, v = r0.detach().clone(), torch.zeros_like(r0), torch.zeros_like(r0)
    lr, b1, b2 = 1e-2, 0.9, 0.999
    for step in range(1, steps + 1):
        g = (torch.softmax(x @ r.t(), dim=1) - p).t() @ x / x.shape[0]
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        r -= lr * (m / (1 - b1 ** step)) / ((v / (1 - b2 ** step)).sqrt() + 1e-8)
    return r


def neuron_weights(ids: torch.Tensor, weights: torch.Tensor, owner: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Per-token weight of every dense neuron [N, I] under a routing (shared neurons: 1)."""
    per_expert = torch.zeros(ids.shape[0], num_experts + 1)
    per_expert[:, num_experts] = 1.0
    per_expert.scatter_(1, ids, weights)
    return per_expert[:, torch.where(owner < 0, num_experts, owner)]


def moefy_mlp(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor,
              cfg: MoEfyConfig) -> tuple[MoEWeights, RouterConfig]:
    """Dense SwiGLU MLP (w1/w3 [I, D], w2 [D, I]) + calibration inputs x [N, D] -> MoE block."""
    i_dense = w1.shape[0]
    if cfg.intermediate != i_dense:
        raise ValueError(f"{cfg.tag} partitions {cfg.intermediate} neurons, the MLP has {i_dense}")
    x, w1, w3, w2 = (t.detach().float() for t in (x, w1, w3, w2))
    h = hidden_acts(x, w1, w3)                                     # [N, I]
    a = h.abs() * w2.norm(dim=0)                                   # contribution magnitudes
    shared = pick_shared(a, cfg.shared_size)
    rest_mask = torch.ones(i_dense, dtype=torch.bool)
    rest_mask[shared] = False
    rest = rest_mask.nonzero().flatten()
    sub = cluster_neurons(a[:, rest], cfg.num_experts, cfg.cluster_iters, cfg.seed)
    groups = [rest[sub == e].sort().values for e in range(cfg.num_experts)]
    owner = torch.full((i_dense,), -1, dtype=torch.long)           # -1: shared
    for e, g in enumerate(groups):
        owner[g] = e

    energy = expert_energy(h, w2, groups)
    router = fit_router(x, energy, cfg.top_k, cfg.router_steps, cfg.router_target, cfg.seed)
    rcfg = RouterConfig(top_k=cfg.top_k, norm_topk_prob=True, routed_scaling_factor=float(cfg.top_k))
    y = h @ w2.t()

    probe = slice(0, min(2048, x.shape[0]))                         # enough tokens to pick a scale

    def out_err(r):
        ids, wts = route(x[probe], r, rcfg)
        z = h[probe] * neuron_weights(ids, wts, owner, cfg.num_experts)
        return (z @ w2.t() - y[probe]).pow(2).sum().item()

    # Router temperature: smaller logits give weights nearer 1 (the dense sum); keep what fits best.
    router = min((router * s for s in (1.0, 0.5, 0.25, 0.1, 0.03)), key=out_err)

    if cfg.refit_down:
        ids, wts = route(x, router, rcfg)
        z = h * neuron_weights(ids, wts, owner, cfg.num_experts)   # what the MoE's w2 sees
        gram = z.t() @ z
        reg = cfg.ridge * gram.diagonal().mean()
        w2 = torch.linalg.solve(gram + reg * torch.eye(i_dense), z.t() @ y + reg * w2.t()).t()

    stack = lambda m, dim: torch.stack([m.index_select(dim, g) for g in groups])  # noqa: E731
    sh = {}
    if cfg.shared_size:
        sh = {"shared_w1": w1[shared].clone(), "shared_w3": w3[shared].clone(), "shared_w2": w2[:, shared].clone()}
    weights = MoEWeights(router=router, w1=stack(w1, 0), w3=stack(w3, 0), w2=stack(w2, 1), **sh)
    return weights, rcfg


# ---------------------------------------------------------------------------------------------
# Whole model, fitted layer by layer
# ---------------------------------------------------------------------------------------------
class _Caught(Exception):
    pass


@torch.no_grad()
def first_layer_inputs(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states and keyword arguments (mask, rotary embeddings, ...) that the model passes to
    its first decoder layer for ids [B, L]: the layers can then be run one at a time."""
    caught = {}

    def grab(_module, args, kwargs):
        caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Caught

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model.model(input_ids=ids, use_cache=False)
    except _Caught:
        pass
    finally:
        handle.remove()
    return caught["hidden"], caught["kwargs"]


@torch.no_grad()
def moefy_model(model, ids: torch.Tensor, cfg: MoEfyConfig, layers: list[int] | None = None,
                progress: bool = True) -> dict[int, tuple[MoEWeights, RouterConfig]]:
    """MoEfy the MLPs (gate_proj / up_proj / down_proj) of a Llama-style causal LM in place, layer by
    layer, on calibration windows ids [B, L]: each layer is fitted on the hidden states that the
    already-MoEfied earlier layers produce (so its router and refit see the inputs they will get).
    Returns {layer: (MoEWeights, RouterConfig)}."""
    from tqdm.auto import tqdm

    from .block import FloatMoE, set_block

    blocks = model.model.layers
    todo = set(range(len(blocks)) if layers is None else layers)
    if not todo or not todo <= set(range(len(blocks))):
        raise ValueError(f"layers must be a non-empty subset of 0..{len(blocks) - 1}, not {layers!r}")
    hidden, kwargs = first_layer_inputs(model, ids)
    out = {}
    for i in tqdm(range(max(todo) + 1), desc=f"MoEfy {cfg.tag}", unit="layer", disable=not progress, leave=False):
        layer = blocks[i]
        if i not in todo:
            hidden = _first(layer(hidden, **kwargs))
            continue
        seen = {}
        pre = layer.mlp.register_forward_pre_hook(lambda _m, a: seen.setdefault("x", a[0]))
        post = layer.mlp.register_forward_hook(lambda _m, a, y: seen.setdefault("y", y))
        try:
            dense_out = _first(layer(hidden, **kwargs))
        finally:
            pre.remove()
            post.remove()
        x, y = seen["x"], seen["y"]
        mlp = layer.mlp
        out[i] = moefy_mlp(x.reshape(-1, x.shape[-1]), mlp.gate_proj.weight, mlp.up_proj.weight,
                           mlp.down_proj.weight, cfg)
        block = set_block(model, i, FloatMoE(*out[i]))
        # The layer adds its MLP output to the residual stream: swap the dense output for the MoE's
        # instead of running the layer again.
        hidden = dense_out - y + block(x)
    return out


def _first(out):
    return out[0] if isinstance(out, tuple) else out
