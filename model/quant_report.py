"""Weight and output errors of the quantizers on SmolLM2's real MLP matrices with real
calibration activations (the check the foundation issue asks for), reusable by tests and CLI."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .compensate import gram
from .contract import QuantFormat
from .quantize import quantize_hqq, quantize_optimized, quantize_rtn


def smollm_mlp_cases(layers: list[int], calib_tokens: int = 4096, eval_tokens: int = 2048, seq_len: int = 256):
    """[(layer, name, W [out, in], calibration inputs [N, in], held-out inputs [M, in])] for the
    gate, up and down matrices of the given SmolLM2 layers, on the reference text."""
    from .perplexity import collect_mlp_inputs
    from .smollm import load_smollm
    from .text import reference_text, token_windows, tokenize

    model, tok = load_smollm(num_layers=max(layers) + 1)
    split = reference_text()
    calib = collect_mlp_inputs(model, token_windows(tokenize(split.calib, tok), seq_len, calib_tokens),
                               max_rows=calib_tokens, layers=layers, progress=False)
    held = collect_mlp_inputs(model, token_windows(tokenize(split.eval, tok), seq_len, eval_tokens),
                              max_rows=eval_tokens, layers=layers, progress=False)
    cases = []
    for layer in layers:
        mlp = model.model.layers[layer].mlp
        wg, wu, wd = (m.weight.detach().float() for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        hidden = lambda x: F.silu(x @ wg.t()) * (x @ wu.t())
        xc, xh = calib[layer], held[layer]
        cases += [(layer, "gate", wg, xc, xh), (layer, "up", wu, xc, xh), (layer, "down", wd, hidden(xc), hidden(xh))]
    return cases


def relative_errors(w: torch.Tensor, w_hat: torch.Tensor, x_calib: torch.Tensor, x_held: torch.Tensor):
    e, w = (w - w_hat).double(), w.double()
    out = lambda x: float((e @ x.double().t()).norm() / (w @ x.double().t()).norm())
    return float(e.norm() / w.norm()), out(x_calib), out(x_held)


def quantizer_table(cases, bits=(2, 3, 4), group: int = 64) -> list[dict]:
    rows = []
    for layer, name, w, xc, xh in cases:
        h = gram(xc)
        for b in bits:
            fmt = QuantFormat(b, group)
            for qname, q in (("rtn", lambda: quantize_rtn(w, fmt)), ("hqq", lambda: quantize_hqq(w, fmt)),
                             ("optimized", lambda: quantize_optimized(w, fmt, h))):
                we, oc, oh = relative_errors(w, q().dequantize(), xc, xh)
                rows.append(dict(layer=layer, matrix=name, bits=b, quantizer=qname,
                                 weight_err=we, output_err_calib=oc, output_err_heldout=oh))
    return rows
