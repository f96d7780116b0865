"""The replay bench's descriptors (sim/cocotb_bench.replay_descriptors): a co-simulated layer's
records become descriptors of the same shapes over fresh data that the golden unit accepts."""
import pytest
import torch

from ndpmoe.model.contract import Descriptor, ErrorCode, Opcode, act_row_len, get_config
from ndpmoe.model.ndp_golden import NdpGoldenUnit
from ndpmoe.sim.cocotb_bench import replay_descriptors


def _record(cfg, d: Descriptor) -> dict:
    """What the co-simulation records of a descriptor (sim/cocotb_cosim.RECORD_FIELDS, less the cycles)."""
    return {"opcode": d.opcode.name, "tokens": d.tokens, "rows": d.rows, "in_features": d.in_features,
            "bits": d.bits, "words": d.words(cfg)}


def test_replayed_descriptors_have_the_recorded_shapes_and_run():
    cfg = get_config("default")
    n_in = 576
    recorded = [Descriptor.load_act(tokens=4, in_features=act_row_len(n_in, cfg.word_bits))]
    for bits, group, rows, n, tokens in ((3, 64, 64, n_in, 4), (3, 64, 576, 64, 2), (4, 32, 16, n_in, 1),
                                         (2, 128, 8, 512, 3)):
        recorded.append(Descriptor.matmul(cfg.fmt(bits, group), tokens=tokens, rows=rows, in_features=n))
    gold = NdpGoldenUnit(cfg, mem=bytearray(1 << 20))
    replayed = replay_descriptors(cfg, [_record(cfg, d) for d in recorded], torch.Generator().manual_seed(1), gold)
    assert len(replayed) == len(recorded)
    ends = []
    for want, got in zip(recorded, replayed):
        assert (got.opcode, got.tokens, got.rows, got.in_features, got.bits) == \
            (want.opcode, want.tokens, want.rows, want.in_features, want.bits)
        assert got.words(cfg) == want.words(cfg)
        assert got.addr % cfg.word_bytes == 0
        ends.append((got.addr, got.addr + got.read_bytes(cfg)))
        results = gold.execute(got)
        assert gold.error == ErrorCode.NONE, got.describe()
        assert len(results) == got.results
    # each descriptor reads its own data
    ends.sort()
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))
    assert replayed[0].opcode == Opcode.LOAD_ACT


def test_a_file_that_is_no_cosimulation_report_is_refused_before_the_build(tmp_path, capsys):
    from ndpmoe.host.cli import main

    bad = tmp_path / "report.json"
    bad.write_text('{"cases": []}')
    assert main(["sim", "--bench", "--replay", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--replay" in err and "report.json" in err and "stall-free" in err
    with pytest.raises(SystemExit) as exit_:
        main(["sim", "--bench", "--replay", str(tmp_path / "missing.json")])
    assert exit_.value.code == 2 and "no such file" in capsys.readouterr().err
