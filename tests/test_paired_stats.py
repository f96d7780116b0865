"""Paired bootstrap intervals: exact ties for identical inputs, decided differences, shrinking with
more evaluation, and clear errors."""
import pytest
import torch

from ndpmoe.host.paired_stats import MIN_UNITS, paired_bootstrap


def _nll(n: int, seed: int, shift: float = 0.0, noise: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLLs of a base model (heavy spread, like real text) and of a variant that differs
    from it by `shift` plus small per-token noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, generator=g, dtype=torch.float64) * 6.0
    other = base + shift + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return base, other


def test_a_configuration_against_itself_is_exactly_zero():
    a, _ = _nll(2048, 1)
    ci = paired_bootstrap(a, a.clone())
    assert (ci.diff, ci.low, ci.high) == (0.0, 0.0, 0.0)
    assert ci.verdict == "tie"


def test_a_clear_difference_is_decided_both_ways():
    a, b = _nll(4096, 2, shift=0.05, noise=0.2)        # b is worse: +0.05 nats per token
    ab, ba = paired_bootstrap(a, b), paired_bootstrap(b, a)
    assert ab.verdict == "wins" and ab.high < 0
    assert ba.verdict == "loses" and ba.low > 0
    assert ab.low <= ab.diff <= ab.high


def test_noise_without_a_shift_is_a_tie():
    a, b = _nll(4096, 3, shift=0.0, noise=0.3)
    assert paired_bootstrap(a, b).verdict == "tie"


def test_pairing_is_what_decides():
    """The same shift hidden under per-token spread is decided only because the tokens are paired:
    each perplexity's own spread over the text is far wider than the difference."""
    a, b = _nll(4096, 4, shift=0.02, noise=0.05)
    ci = paired_bootstrap(a, b)
    assert ci.verdict == "wins"
    own = paired_bootstrap(a, torch.full_like(a, float(a.mean())))   # a against a constant: its own spread
    assert (own.high - own.low) > 10 * (ci.high - ci.low)


def test_intervals_shrink_as_the_evaluation_grows():
    widths = []
    for n in (2048, 8192, 32768):
        a, b = _nll(n, 5, shift=0.01, noise=0.3)
        ci = paired_bootstrap(a, b)
        widths.append(ci.high - ci.low)
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] > 1.5 * widths[2]


def test_windows_as_a_list_are_flattened_in_order():
    a, b = _nll(2048, 6, shift=0.03, noise=0.1)
    whole = paired_bootstrap(a, b)
    split = paired_bootstrap(list(a.reshape(4, -1)), list(b.reshape(4, -1)))
    assert whole == split


@pytest.mark.parametrize("kw, message", [(dict(units=MIN_UNITS - 1), "units must be an integer >= 30"),
                                         (dict(resamples=10), "resamples must be an integer >= 100"),
                                         (dict(level=1.0), "level must be in"),
                                         (dict(units=5000), "cannot make 5000 resampling units")])
def test_bad_settings_are_refused(kw, message):
    a, b = _nll(2048, 7)
    with pytest.raises(ValueError, match=message):
        paired_bootstrap(a, b, **kw)


def test_unpaired_lengths_are_refused():
    a, b = _nll(2048, 8)
    with pytest.raises(ValueError, match="same tokens: 2048 against 2047"):
        paired_bootstrap(a, b[:-1])


def test_perplexity_hands_back_the_nlls_it_averaged():
    """The per-token NLLs come from the same forward pass: their mean is the log-perplexity, and
    asking for them does not change the perplexity."""
    import math

    from transformers import LlamaConfig, LlamaForCausalLM

    from ndpmoe.model.perplexity import perplexity

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64))
    windows = torch.randint(97, (3, 33), generator=torch.Generator().manual_seed(1))
    plain = perplexity(model, windows, progress=False)
    nll: list = []
    again = perplexity(model, windows, progress=False, token_nll=nll)
    assert again == plain
    assert [t.shape for t in nll] == [torch.Size([32])] * 3
    assert math.log(plain) == pytest.approx(float(torch.cat(nll).mean()), rel=1e-6)   # fp32 sums vs fp64 mean
    # The inputs' collection pass hands back the same NLLs, so the study's fp16 row reuses it.
    from ndpmoe.model.perplexity import collect_mlp_inputs, perplexity_of
    collected: list = []
    inputs = collect_mlp_inputs(model, windows, max_rows=None, layers=[1], progress=False, token_nll=collected)
    assert inputs[1].shape == (3 * 33, 32)
    assert all(torch.equal(a, b) for a, b in zip(collected, nll)) and len(collected) == 3
    assert perplexity_of(collected) == plain


def _row_errors(layers: int, rows: int, seed: int, scale: float = 1.0, noise: float = 0.0):
    """Per-row squared output errors of a configuration [layers, rows] with heavy per-row spread,
    a variant whose errors are `scale` times them with multiplicative noise, and the reference norms."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(layers, rows, generator=g, dtype=torch.float64) * 4 + 1
    base = ref * 0.01 * torch.rand(layers, rows, generator=g, dtype=torch.float64) * 3
    other = base * scale * (1 + noise * torch.randn(layers, rows, generator=g, dtype=torch.float64)).clamp_min(0)
    return base, other, ref


def test_layer_error_interval_is_paired_and_decides_both_ways():
    from ndpmoe.host.paired_stats import paired_layer_error
    a, b, ref = _row_errors(6, 1024, 7, scale=1.03, noise=0.05)       # b's squared errors 3 % larger
    direct = lambda e: float((e.sum(1) / ref.sum(1)).mean().sqrt())
    ab = paired_layer_error([a, b], ref, [1.0, -1.0])
    assert ab.diff == pytest.approx(direct(a) - direct(b), rel=1e-12)
    assert ab.verdict == "wins" and ab.low <= ab.diff <= ab.high
    assert paired_layer_error([b, a], ref, [1.0, -1.0]).verdict == "loses"
    same = paired_layer_error([a, a.clone()], ref, [1.0, -1.0])
    assert (same.diff, same.low, same.high) == (0.0, 0.0, 0.0)
    _, noisy, _ = _row_errors(6, 1024, 7, scale=1.0, noise=0.3)        # no shift, only per-row noise
    assert paired_layer_error([a, noisy], ref, [1.0, -1.0]).verdict == "tie"
    # a chord between two configurations: the contrast's point value is the chord's
    chord = paired_layer_error([a, a, b], ref, [1.0, -0.5, -0.5])
    assert chord.diff == pytest.approx(direct(a) - 0.5 * direct(a) - 0.5 * direct(b), rel=1e-12)


def test_layer_error_interval_refuses_mismatched_rows():
    from ndpmoe.host.paired_stats import paired_layer_error
    a, b, ref = _row_errors(4, 256, 8)
    with pytest.raises(ValueError, match=r"per-row errors must all be \[layers, rows\]"):
        paired_layer_error([a, b[:, :200]], ref, [1.0, -1.0])
    with pytest.raises(ValueError, match="at least two configurations"):
        paired_layer_error([a], ref, [1.0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        paired_layer_error([a, b * float("nan")], ref, [1.0, -1.0])
