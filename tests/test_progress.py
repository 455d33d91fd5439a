"""The progress reporter: plain periodic lines off a terminal, a redrawn bar on one, ETA maths."""

import io

from sdray.progress import Progress, format_duration, track


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_plain_lines_every_interval_with_rate_and_eta(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("sdray.progress.time.monotonic", clock)
    out = io.StringIO()
    bar = Progress("featurize", total=100, unit="samples", every_s=10, stream=out, enabled=True)
    clock.t += 5
    bar.update(10)  # 5 s: below the interval, nothing printed
    assert out.getvalue() == ""
    clock.t += 5
    bar.update(10)  # 10 s, 20 done: 2/s, 80 left -> ETA 40 s
    assert out.getvalue() == "featurize: 20/100 (20%) 2.0 samples/s, elapsed 0:10, ETA 0:40\n"
    clock.t += 40
    bar.update(80)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines[-1] == "featurize: 100/100 (100%) 2.0 samples/s, elapsed 0:50, ETA 0:00"
    assert "\r" not in out.getvalue()


def test_terminal_gets_a_bar_redrawn_in_place():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    for _ in track(range(4), "index", unit="shards", stream=out, enabled=True):
        pass
    text = out.getvalue()
    assert text.startswith("\r[") and "4/4 (100%)" in text and "[" + "#" * 24 + "]" in text
    assert text.endswith("\n") and text.count("\n") == 1


def test_disabled_prints_nothing():
    out = io.StringIO()
    with Progress("x", 3, stream=out, enabled=False) as bar:
        bar.update(3)
    assert out.getvalue() == ""


def test_format_duration():
    assert format_duration(75.2) == "1:15" and format_duration(3725) == "1:02:05" and format_duration(-1) == "0:00"


def test_postfix_follows_the_counts():
    out = io.StringIO()
    bar = Progress("train", 10, "steps", stream=out, enabled=True)
    bar.update(5, postfix="loss 1.2500")
    bar.close()
    assert out.getvalue().rstrip().endswith("| loss 1.2500") and "5/10 (50%)" in out.getvalue()


def test_eta_without_printing(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("sdray.progress.time.monotonic", clock)
    bar = Progress("train", 30, "steps", enabled=False)
    assert bar.eta() == "?"
    clock.t += 20
    bar.update(10)
    assert bar.eta() == "0:40"


def test_quiet_logging_silences_progress_by_default():
    import logging

    from sdray.progress import configure_logging

    logger = logging.getLogger("sdray")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    try:
        configure_logging("INFO", quiet=True)
        assert Progress("x", 1, stream=io.StringIO()).enabled is False
        configure_logging("INFO")
        assert Progress("x", 1, stream=io.StringIO()).enabled is True
    finally:
        logger.setLevel(saved[0]); logger.handlers = saved[1]; logger.propagate = saved[2]


def test_slow_rates_keep_their_digits(monkeypatch):
    clock = Clock()
    monkeypatch.setattr("sdray.progress.time.monotonic", clock)
    bar = Progress("featurize", 11, "shards", enabled=False)
    clock.t += 40
    bar.update(3)
    assert bar.line() == "featurize: 3/11 (27%) 0.075 shards/s, elapsed 0:40, ETA 1:47"
