"""Calibration and evaluation text: disjoint, deterministic, offline."""
import pytest
import torch

from ndpmoe.model.text import file_text, paragraphs, reference_text, split_topics, token_windows


def test_reference_split_is_disjoint_by_topic_and_paragraph():
    s = reference_text()
    assert s.calib_topics and s.eval_topics
    assert not set(s.calib_topics) & set(s.eval_topics)
    calib = set(paragraphs(s.calib))
    assert not calib & set(paragraphs(s.eval))
    # topics that share text ("compound" holds "if", "while", ...) stay on one side
    assert {"compound", "if", "while", "try"} <= set(s.calib_topics) or {"compound", "if"} <= set(s.eval_topics)
    frac = len(s.eval) / (len(s.eval) + len(s.calib))
    assert 0.2 < frac < 0.4, frac
    assert len(s.calib) > 150_000 and len(s.eval) > 60_000
    assert reference_text().digest == s.digest            # deterministic


def test_split_topics_keeps_shared_paragraphs_on_one_side():
    shared = "x" * 100
    topics = {"a": f"alpha one\n\n{shared}", "b": f"{shared}\n\nbeta", "c": "gamma " * 40, "d": "delta " * 40}
    s = split_topics(topics, eval_fraction=0.3)
    assert ("a" in s.calib_topics) == ("b" in s.calib_topics)
    assert not set(paragraphs(s.calib)) & set(paragraphs(s.eval))
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        split_topics(topics, eval_fraction=1.5)


def test_file_text_halves(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("\n\n".join(f"Paragraph {i} " + "word " * 20 for i in range(10)))
    s = file_text(f)
    assert s.calib.startswith("Paragraph 0") and s.eval.startswith("Paragraph 5")
    assert not set(paragraphs(s.calib)) & set(paragraphs(s.eval))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        file_text(tmp_path / "missing.txt")
    (tmp_path / "one.txt").write_text("only one paragraph")
    with pytest.raises(ValueError, match="at least 2 paragraphs"):
        file_text(tmp_path / "one.txt")


def test_token_windows():
    toks = torch.arange(1000)
    w = token_windows(toks, 100)
    assert w.shape == (10, 100) and torch.equal(w[3], torch.arange(300, 400))
    w = token_windows(toks, 100, max_tokens=300)
    assert w.shape == (3, 100) and w[0, 0] == 0 and w[-1, 0] == 900      # spread over the text
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        token_windows(toks, 1)
    with pytest.raises(ValueError, match="fewer than one window"):
        token_windows(toks[:50], 100)
