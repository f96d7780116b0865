"""The single-matrix quantizers and fits give, bit for bit, what the implementation before the
stacked rewrite gave (loaded from git history at REFERENCE_COMMIT), on random and on SmolLM2's
real matrices: the study's cached results and table do not move. Skipped outside a git checkout."""
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ndpmoe.model import compensate as new_c
from ndpmoe.model import quantize as new_q
from ndpmoe.model.contract import QuantFormat

REFERENCE_COMMIT = "1decccf"       # last commit with the one-matrix-at-a-time implementation
ROOT = Path(__file__).resolve().parent.parent
FILES = ("contract.py", "packing.py", "qtensor.py", "quantize.py", "compensate.py")


@pytest.fixture(scope="module")
def ref(tmp_path_factory, one_thread):
    pkg = tmp_path_factory.mktemp("ref") / "ndpmoe_ref_model"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in FILES:
        try:
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{REFERENCE_COMMIT}:model/{name}"],
                                  check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            pytest.skip(f"commit {REFERENCE_COMMIT} is not reachable (not a git checkout of the project)")
        (pkg / name).write_text(text)
    sys.path.insert(0, str(pkg.parent))
    try:
        yield (importlib.import_module("ndpmoe_ref_model.quantize"), importlib.import_module("ndpmoe_ref_model.compensate"))
    finally:
        sys.path.remove(str(pkg.parent))


def _cases():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(256, 256, generator=g) * torch.logspace(0, -2, 256)
    x = torch.randn(1024, 256, generator=g) @ mix
    x[:, :3] *= 20
    w = (torch.randn(96, 256, generator=g) ** 3) * 0.02          # heavy tails
    return [("random", w, x)]


def _real_cases():
    from ndpmoe.model.quant_report import smollm_mlp_cases
    return [(f"smollm-{name}", w, xc) for _, name, w, xc, _ in smollm_mlp_cases([1], calib_tokens=1024, eval_tokens=256)]


def _same_q(a, b):
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.zero, b.zero)
    assert a.scale_exp == b.scale_exp


def _same_f(a, b):
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.spectrum, b.spectrum)


@pytest.mark.parametrize("real", [False, True], ids=["random", "smollm"])
def test_single_matrix_api_matches_reference(ref, real):
    rq, rc = ref
    for label, w, x in (_real_cases() if real else _cases()):
        h = new_c.gram(x)
        for bits in ((3,) if real else (2, 3, 4, 8)):      # every width on the small case: time
            fmt = QuantFormat(bits, 64)
            _same_q(new_q.quantize_rtn(w, fmt), rq.quantize_rtn(w, fmt))
            _same_q(new_q.quantize_hqq(w, fmt), rq.quantize_hqq(w, fmt))
            opt = new_q.quantize_optimized(w, fmt, h)
            _same_q(opt, rq.quantize_optimized(w, fmt, h))
            if bits == 3:
                err = w - opt.dequantize()
                _same_f(new_c.fit_svd(err, 16), rc.fit_svd(err, 16))
                _same_f(new_c.fit_activation_aware(err, h, 16), rc.fit_activation_aware(err, h, 16))


def test_float64_stack_matches_single_matrix_calls(one_thread):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 40, 128, generator=g) * 0.02
    x = torch.randn(3, 512, 128, generator=g)
    h = torch.stack([new_c.gram(xe) for xe in x])
    fmt = QuantFormat(3, 64)
    for method in new_q.QUANTIZER_NAMES:
        stack = new_q.quantize_stack(w, fmt, method, h, precision="float64")
        for e in range(3):
            _same_q(stack[e], new_q.get_quantizer(method)(w[e], fmt, h[e]))
    err = w - torch.stack([q.dequantize() for q in new_q.quantize_stack(w, fmt, "rtn", precision="float64")])
    for e, f in enumerate(new_c.fit_svd_stack(err, 8, precision="float64")):
        _same_f(f, new_c.fit_svd(err[e], 8))
    for e, f in enumerate(new_c.fit_activation_aware_stack(err, h, 8, precision="float64")):
        _same_f(f, new_c.fit_activation_aware(err[e], h[e], 8))
