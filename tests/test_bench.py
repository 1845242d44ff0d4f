"""The benchmark scripts run and say what they measured: tiny shapes, numbers checked only where they are counts
or grow by a known law."""

import itertools
import math

import pytest

from commands import run

pytestmark = pytest.mark.slow


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the first Markdown table under a line that starts with ``header``."""
    lines = itertools.takewhile(lambda line: line.startswith("|"), text[text.index(header) :].splitlines()[2:])
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_sampling_bench_counts_one_prefill_per_slide(tmp_path):
    out = tmp_path / "sampling.md"
    args = ["--seq-lens", "128", "--new-tokens", "2", "--past-seq-len", "128", "--past", "2", "3", "--slides", "32", "64"]
    result = run("bench/sampling.py", "--d-model", "32", "--layers", "1", "--heads", "2", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert f"`python bench/sampling.py --d-model 32 --layers 1 --heads 2 {' '.join(args)} --out {out}`" in text
    past = table_rows(text, "| N | pattern | tokens generated")
    assert len(past) == 3 * 2 * 2  # patterns x slides x lengths
    for n, _, length, slide, prefills, *_ in past:
        n, length, slide = int(n), int(length), int(slide)
        assert int(prefills) == 1 + math.ceil((length - n) / slide)  # the first window, then one per slide


def test_attention_bench_writes_a_table_and_a_plot(tmp_path):
    out = tmp_path / "attention.md"
    args = ["--device", "cpu", "--seq-lens", "128", "256", "--heads", "2", "--head-dim", "16", "--block-size", "16"]
    result = run("bench/attention.py", *args, "--stride", "32", "--backends", "sdpa", "cpp", "pieces", "--reps", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "| cpp | strided | 256 |" in text and "| pieces | strided | 256 |" in text and "| sdpa | causal | 256 |" in text
    assert "avx" in text.splitlines()[0] or "asimd" in text.splitlines()[0]  # the CPU's instruction sets are named
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_memory_bench_sees_the_reference_grow_quadratically(tmp_path):
    out = tmp_path / "memory.md"
    args = ["--seq-lens", "256", "512", "--heads", "2", "--head-dim", "16", "--block-size", "16", "--layouts", "strided"]
    result = run("bench/memory.py", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {(r[0], r[1]): r[2:] for r in table_rows(out.read_text(), "| backend | layout |")}
    assert set(rows) == {("sdpa", "causal"), ("cpp", "strided"), ("pieces", "strided"), ("blocks", "strided"), ("reference", "strided")}
    small, large = (float(x) for x in rows["reference", "strided"][:2])
    assert large > 3 * small > 0  # its N x N matrices: 4x the bytes at 2N
    text = out.read_text()
    held = {(r[0], r[1]): r[2:] for r in table_rows(text[text.index("caches hold") :], "| backend | layout |")}
    assert float(held["pieces", "strided"][1]) > float(held["pieces", "strided"][0]) > 0  # its masks, counted


def test_peers_bench_trains_both_models_on_the_same_budget(tmp_path):
    pytest.importorskip("x_transformers", reason="bench/peers.py needs the peers extra: pip install -e '.[peers]'")
    out = tmp_path / "peers.md"
    result = run("bench/peers.py", "--cases", "64:2:4", "--skip", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r[3]: r for r in table_rows(out.read_text(), "| N | batch | steps | model |")}
    assert set(rows) == {"peer", "ours"}
    for row in rows.values():
        n, batch, steps, _, _, tokens_per_s, _, _, peak, _, growth, _, bits, _ = row
        assert (n, batch, steps) == ("64", "2", "4")
        assert float(tokens_per_s.replace(",", "")) > 0 and float(peak) > float(growth) > 0
        assert 0 < float(bits) < 9  # bits per byte of a barely trained model: about 8, never more than 9
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_busy_bench_times_each_setting_idle_and_beside_a_busy_process(tmp_path):
    out = tmp_path / "busy.md"
    args = ["--config", "configs/tiny.yaml", "--settings", "default", "spin-1k", "--steps", "2", "--skip", "1", "--rounds", "1"]
    result = run("bench/busy.py", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r[0]: r for r in table_rows(out.read_text(), "| setting |")}
    assert set(rows) == {"default", "spin-1k"}
    assert rows["spin-1k"][1] == "`GOMP_SPINCOUNT=1000`" and rows["default"][4] == "+0.0%"
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows.values())
