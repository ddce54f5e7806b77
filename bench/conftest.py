"""Shared benchmark fixtures and the closing table of ratios against same-run baselines.

Run: `python -m pytest bench/ --benchmark-only`. Sizes scale with CPTFAST_BENCH_SCALE
(default 1.0; the acceptance numbers in the issues are quoted at 1.0).
"""

import os

import pytest

SCALE = float(os.environ.get("CPTFAST_BENCH_SCALE", "1.0"))
_RATIOS: list[tuple[str, str, float, str]] = []
_METRICS: list[tuple[str, str, str]] = []


def record_ratio(name: str, baseline: str, ratio: float, note: str = "") -> None:
    """Remember `ours / baseline` (higher is better) for the summary printed at the end."""
    _RATIOS.append((name, baseline, ratio, note))


def record_metric(name: str, value: str, note: str = "") -> None:
    """Remember a measured value that is not a ratio (a share, a time, a memory size)."""
    _METRICS.append((name, value, note))


def pytest_terminal_summary(terminalreporter):
    if _RATIOS:
        terminalreporter.section("cptfast: ratios against same-run baselines (higher is better)")
        for name, baseline, ratio, note in _RATIOS:
            terminalreporter.write_line(f"{name:<44} vs {baseline:<34} {ratio:8.2f}x  {note}")
    if _METRICS:
        terminalreporter.section("cptfast: measured values")
        for name, value, note in _METRICS:
            terminalreporter.write_line(f"{name:<44} {value:>14}  {note}")


@pytest.fixture(scope="session")
def bench_tokenizer(tmp_path_factory):
    from cptfast.demo import build_tokenizer, domain_document, general_document
    import random

    rng = random.Random(0)
    texts = [domain_document(rng) for _ in range(300)] + [general_document(rng) for _ in range(300)]
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"), texts, vocab_size=2048)
