"""Golden model, layer 3: the bit-exact integer arithmetic of the NDP datapath, and a functional
model of the whole unit (memory, activation buffer, descriptors, error codes, results).

The RTL must produce exactly the integers `ndp_matmul` produces; the test benches and the host
runtime's golden backend both use this module.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .contract import (ACC_BITS, ACT_MAX, GROUP_SIZES, ZERO_FRAC_BITS, Descriptor, ErrorCode, NdpConfig,
                       Opcode, State, act_row_len)
from .qtensor import QuantizedMatrix


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8: x [T, D] -> (x_q int8 [T, D], x_scale float32 [T])."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise TypeError(f"x must be a 2-D float tensor, not {getattr(x, 'dtype', type(x))} "
                        f"of shape {tuple(getattr(x, 'shape', ()))}")
    if not torch.isfinite(x).all():
        raise ValueError("activations contain NaN or Inf")
    amax = x.abs().amax(dim=1).float()
    x_scale = torch.where(amax > 0, amax / ACT_MAX, torch.ones_like(amax))
    x_q = torch.round(x.float() / x_scale[:, None]).clamp(-ACT_MAX, ACT_MAX).to(torch.int8)
    return x_q, x_scale


def ndp_matmul(qm: QuantizedMatrix, x_q: torch.Tensor) -> torch.Tensor:
    """The NDP's integer result acc [T, rows] (int64) for int8 activations x_q [T, in].

    Group sums are formed in float64, which is exact here: every partial sum is below 2^23
    (contract.GROUP_QX_BITS), far inside float64's 53-bit mantissa.
    """
    if x_q.dtype != torch.int8 or x_q.dim() != 2 or x_q.shape[1] != qm.in_features:
        raise ValueError(f"x_q must be int8 [T, {qm.in_features}], not {x_q.dtype} {tuple(x_q.shape)}")
    g = qm.fmt.group_size
    x = x_q.to(torch.float64).reshape(x_q.shape[0], -1, g)                # [T, n_groups, G]
    q = qm.codes.to(torch.float64).reshape(qm.rows, -1, g)               # [R, n_groups, G]
    sum_qx = torch.einsum("rgi,tgi->trg", q, x).to(torch.int64)          # [T, R, n_groups]
    sum_x = x.sum(-1).to(torch.int64)                                    # [T, n_groups]
    term = (sum_qx << ZERO_FRAC_BITS) - qm.zero.to(torch.int64)[None] * sum_x[:, None, :]
    acc = (term * qm.scale.to(torch.int64)[None]).sum(-1)                # [T, R]
    lim = 1 << (ACC_BITS - 1)
    assert int(acc.abs().max()) < lim if acc.numel() else True, "accumulator overflow: contract bound broken"
    return acc


def acc_to_float(acc: torch.Tensor, scale_exp: int, x_scale: torch.Tensor) -> torch.Tensor:
    """Float wrapper: the host's view of an NDP result, [T, rows] float32."""
    return (acc.to(torch.float64) * 2.0 ** -(scale_exp + ZERO_FRAC_BITS) * x_scale.double()[:, None]).float()


def ndp_compensation(B_q: QuantizedMatrix, A_ndp: QuantizedMatrix, rank_scale: torch.Tensor, x_q: torch.Tensor,
                     x_scale: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """A (B x) of low-bit factors as the NDP runs it, two ordinary MATMULs [T, out] float32.

    B_q: the stored B rows (a prefix of rank r = B_q.rows), as packed (factor_quant.fit_quantized);
    A_ndp: A as the NDP reads it (factor_quant.ndp_a_image: A^T's codes transposed, unit scale,
    mid-range zero Z); rank_scale [r]: the scale s_k of each A column; ranks [T]: each token's rank.

    1. MATMUL of B's first r rows against the loaded x_q: bx = acc * 2^-(e_B + 4) * x_scale
       (float32, acc_to_float);
    2. the host zeroes bx[t, k] for k >= ranks[t], multiplies column k by s_k (float32) and pads
       to A_ndp's inputs with zeros: z [T, roundup(r, 32)];
    3. z is re-quantized per token to symmetric int8 (quantize_activations) and loaded (LOAD_ACT);
    4. MATMUL of A_ndp against z_q: y = acc * 2^-4 * z_scale = sum_k (code[o, k] - Z) z_q[t, k] z_scale[t].
    The only roundings beyond the stored factors are the two int8 activations (x and z).
    """
    r = B_q.rows
    bx = acc_to_float(ndp_matmul(B_q, x_q), B_q.scale_exp, x_scale)
    bx = bx * (torch.arange(r)[None, :] < ranks[:, None])
    z = torch.zeros(x_q.shape[0], A_ndp.in_features)
    z[:, :r] = bx * rank_scale[:r].float()[None, :]
    z_q, z_scale = quantize_activations(z)
    return acc_to_float(ndp_matmul(A_ndp, z_q), A_ndp.scale_exp, z_scale)


def act_image(x_q: torch.Tensor, word_bits: int) -> torch.Tensor:
    """Int8 activations [T, in] -> their memory image: rows of act_row_len bytes, zero padded."""
    t, n = x_q.shape
    out = torch.zeros(t, act_row_len(n, word_bits), dtype=torch.uint8)
    out[:, :n] = x_q.view(torch.uint8)
    return out.reshape(-1)


# ---------------------------------------------------------------------------------------------
# Functional model of the whole unit
# ---------------------------------------------------------------------------------------------
def check_descriptor(cfg: NdpConfig, d: Descriptor, loaded: tuple[int, int]) -> ErrorCode:
    """The unit's validation of a descriptor, in the order the hardware checks it.

    `loaded` is (tokens, in_features) of the last LOAD_ACT. Returns ErrorCode.NONE when it runs.
    """
    if not isinstance(d, Descriptor):
        raise TypeError(f"expected a contract.Descriptor (Descriptor.decode(raw) for a packed word), not {d!r}")
    if d.opcode not in (Opcode.NOP, Opcode.LOAD_ACT, Opcode.MATMUL):
        return ErrorCode.BAD_OPCODE
    if d.opcode == Opcode.NOP:
        return ErrorCode.NONE
    if d.tokens == 0 or d.tokens > cfg.t_max:
        return ErrorCode.BAD_TOKENS
    n_in = d.in_features
    if d.opcode == Opcode.LOAD_ACT:
        if n_in == 0 or n_in % cfg.word_bits or n_in > cfg.max_in_features:
            return ErrorCode.BAD_IN_FEATURES
    else:
        if d.bits not in cfg.bits:
            return ErrorCode.BAD_BITS
        if d.group not in GROUP_SIZES:
            return ErrorCode.BAD_GROUP
        if n_in == 0 or n_in % d.group_size or n_in > cfg.max_in_features:
            return ErrorCode.BAD_IN_FEATURES
        if d.rows == 0:
            return ErrorCode.BAD_ROWS
        if d.tokens > loaded[0] or d.fmt(cfg.word_bits).padded_in(n_in) > loaded[1]:
            return ErrorCode.ACT_MISMATCH
    if d.addr % cfg.word_bytes:
        return ErrorCode.MISALIGNED_ADDR
    if d.addr + d.read_bytes(cfg) > cfg.mem_bytes:
        return ErrorCode.ADDR_RANGE
    return ErrorCode.NONE


@dataclass
class NdpGoldenUnit:
    """Descriptor-level functional model: same memory, same descriptors, same results as the RTL."""
    cfg: NdpConfig
    mem: bytearray = field(default_factory=bytearray)
    state: State = State.IDLE
    error: ErrorCode = ErrorCode.NONE
    act: torch.Tensor | None = None            # int8 [t_loaded, in_loaded]

    def __post_init__(self):
        if not self.mem:
            self.mem = bytearray(min(self.cfg.mem_bytes, 1 << 24))

    @property
    def loaded(self) -> tuple[int, int]:
        return (0, 0) if self.act is None else tuple(self.act.shape)

    def write(self, addr: int, data: torch.Tensor | bytes) -> None:
        raw = bytes(data.numpy().tobytes()) if isinstance(data, torch.Tensor) else bytes(data)
        if addr < 0 or addr + len(raw) > len(self.mem):
            raise ValueError(f"write of {len(raw)} bytes at {addr:#x} runs past memory of {len(self.mem)} bytes")
        self.mem[addr:addr + len(raw)] = raw

    def _read(self, addr: int, n: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.mem[addr:addr + n]), dtype=torch.uint8)

    def execute(self, d: Descriptor) -> list[tuple[int, int, int]]:
        """Run one descriptor; returns results as (token, row, value) in output order."""
        err = check_descriptor(self.cfg, d, self.loaded)
        if err != ErrorCode.NONE:
            self.state, self.error = State.ERROR, err
            return []
        self.state, self.error = State.DONE, ErrorCode.NONE
        if d.opcode == Opcode.NOP:
            return []
        image = self._read(d.addr, d.read_bytes(self.cfg))
        if d.opcode == Opcode.LOAD_ACT:
            self.act = image.view(torch.int8).reshape(d.tokens, d.in_features).clone()
            return []
        qm = QuantizedMatrix.from_image(image, d.fmt(self.cfg.word_bits), d.rows, d.in_features, scale_exp=0)
        acc = ndp_matmul(qm, self.act[:d.tokens, :d.in_features].contiguous())
        return [(t, r, int(acc[t, r])) for t, r in d.output_order()]
