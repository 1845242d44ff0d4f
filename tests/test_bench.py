"""The benchmark scripts run and say what they measured: tiny shapes, numbers checked only where they are counts
or grow by a known law."""

import itertools
import math
import re
import time

import pytest
import torch

from bench.breakdown import PARTS, Timeline, our_boundaries, peer_boundaries, step_parts
from bench.peers import run_order
from commands import run
from sparse_transformer.model import ModelConfig, SparseTransformer
from sparse_transformer.model.patterns import AttentionPattern


def table_rows(text: str, header: str) -> list[list[str]]:
    """The cells of the first Markdown table under a line that starts with ``header``."""
    lines = itertools.takewhile(lambda line: line.startswith("|"), text[text.index(header) :].splitlines()[2:])
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


@pytest.mark.slow
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


@pytest.mark.slow
def test_sampling_bench_generates_whole_contexts_and_weighs_the_cache(tmp_path):
    out = tmp_path / "sampling-long.md"
    args = ["--d-model", "32", "--layers", "1", "--heads", "2", "--whole", "256", "1024", "--whole-block-size", "16"]
    result = run("bench/sampling.py", *args, "--whole-patterns", "strided", "fixed", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = table_rows(out.read_text(), "| pattern | N | stride")
    assert [(name, int(n), int(stride)) for name, n, stride, *_ in rows] == [
        ("strided", 256, 64), ("strided", 1024, 128), ("fixed", 256, 64), ("fixed", 1024, 128)
    ]  # fmt: skip
    peak = {(name, int(n)): float(share) for name, n, *_, share in rows}
    for _, n, *_, full, _ in rows:
        assert float(full) == pytest.approx(2 * int(n) * 32 * 4 / 2**20, abs=0.05)  # 1 layer x (k, v) x N x d x fp32
    # A strided column reads every block again a stride later: held to the end. Fixed drops each chunk behind it.
    assert peak["strided", 1024] > 0.9 and peak["fixed", 1024] < 0.5 * peak["strided", 1024]


@pytest.mark.slow
def test_attention_bench_writes_a_table_and_a_plot(tmp_path):
    out = tmp_path / "attention.md"
    args = ["--device", "cpu", "--seq-lens", "128", "256", "--heads", "2", "--head-dim", "16", "--block-size", "16"]
    result = run("bench/attention.py", *args, "--stride", "32", "--backends", "sdpa", "cpp", "pieces", "--reps", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert "| cpp | strided | 256 |" in text and "| pieces | strided | 256 |" in text and "| sdpa | causal | 256 |" in text
    assert "avx" in text.splitlines()[0] or "asimd" in text.splitlines()[0]  # the CPU's instruction sets are named
    assert out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.slow
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


@pytest.mark.slow
def test_peers_bench_trains_both_models_on_the_same_budget(tmp_path):
    pytest.importorskip("x_transformers", reason="bench/peers.py needs the peers extra: pip install -e '.[peers]'")
    out = tmp_path / "peers.md"
    result = run("bench/peers.py", "--cases", "64:2:4", "--skip", "1", "--rounds", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    rows = {r[3]: r for r in table_rows(text, "| N | batch | steps | model |")}
    assert set(rows) == {"peer", "peer, plain script", "ours"}
    for side, row in rows.items():
        n, batch, steps, _, _, tokens_per_s, _, _, bits, _ = row
        assert (n, batch, steps) == ("64", "2", "4")
        assert float(tokens_per_s.replace(",", "")) > 0
        if side != "peer, plain script":  # it has no validation split
            assert 0 < float(bits) < 9  # bits per byte of a barely trained model: about 8, never more than 9
    memory = {r[1]: r for r in table_rows(text, "| N | model | imports |")}
    assert memory["peer, plain script"][2] == "torch, x-transformers"
    for _, _, _, peak, _, working, _, after_imports in memory.values():
        assert float(peak) > float(after_imports) > 0 and float(peak) > float(working) > 0
    runs = table_rows(text, "| N | round | model | load before")
    assert [r[2] for r in runs] == ["peer", "ours", "peer, plain script"]  # round 0: the peer first
    assert all(len(r[3].split()) == 3 for r in runs)  # the load before each run
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_runs_alternate_which_side_goes_first():
    sides = ["peer", "ours", "plain"]
    order = run_order(sides, 3)
    assert [[s for r, s in order if r == i] for i in range(3)] == [sides, sides[::-1], sides]


def test_step_parts_give_every_moment_of_a_step_to_one_part():
    marks = [[0.0, 10.0, 20.0, 25.0], [30.0]]  # start, loss computed, backward done, optimizer done; the next start
    events = [(1.0, "embeddings forward"), (2.0, "attention forward"), (3.0, "kernel forward"), (3.5, "kernel forward"),
              (4.0, "kernel forward end"), (5.0, "MLP forward"), (8.0, "loss forward"), (12.0, "MLP backward"),
              (15.0, "attention backward"), (16.0, "kernel backward"), (17.0, "kernel backward end"),
              (17.5, "kernel backward end"), (19.0, "embeddings backward")]  # fmt: skip
    (step,) = step_parts(marks, events)
    assert step["step"] == 30.0 == sum(step[p] for p in PARTS if not p.startswith("kernel"))
    assert (step["loop"], step["optimizer"], step["loss backward"], step["embeddings backward"]) == (6.0, 5.0, 2.0, 1.0)
    assert (step["attention forward"], step["kernel forward"]) == (3.0, 0.5)  # from the last q/k/v projection
    assert (step["attention backward"], step["kernel backward"]) == (4.0, 1.0)  # to the first q/k/v gradient


@pytest.mark.parametrize("side", ["ours", "peer"])
def test_breakdown_hooks_see_every_part_in_order(side):
    """The boundaries are found by module names: a renamed module in either model fails here."""
    layers = 2
    if side == "peer":
        pytest.importorskip("x_transformers", reason="the peer needs the peers extra: pip install -e '.[peers]'")
        from bench.plain_peer import build_peer

        model = build_peer(32, 16, layers, 2, 4)
        boundaries = peer_boundaries(model)
    else:
        pattern = AttentionPattern("strided", block_size=4, stride=8, heads="split")
        model = SparseTransformer(ModelConfig(seq_len=32, d_model=16, n_layers=layers, n_heads=2, pattern=pattern))
        boundaries = our_boundaries(model)
    timeline = Timeline()
    timeline.watch(boundaries)
    start = time.perf_counter()
    loss = model(torch.randint(0, 256, (2, 32))).sum()
    loss_end = time.perf_counter()
    loss.backward()
    end = time.perf_counter()
    parts = [part for _, part in timeline.events if not part.startswith("kernel")]
    forward = ["attention forward", "MLP forward"] * layers
    backward = ["MLP backward", "attention backward"] * layers
    assert parts == ["embeddings forward", *forward, "loss forward", *backward, "embeddings backward"]
    (step,) = step_parts([[start, loss_end, end, end], [end]], timeline.events)
    assert step["step"] == pytest.approx(sum(step[p] for p in PARTS if not p.startswith("kernel")))
    for phase in ("forward", "backward"):
        assert 0 < step[f"kernel {phase}"] < step[f"attention {phase}"]


@pytest.mark.slow
def test_breakdown_bench_times_every_part_of_both_sides(tmp_path):
    pytest.importorskip("x_transformers", reason="bench/breakdown.py needs the peers extra: pip install -e '.[peers]'")
    out = tmp_path / "breakdown.md"
    result = run("bench/breakdown.py", "--cases", "64:2:4", "--skip", "1", "--rounds", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r[0]: [float(c.rstrip("%")) for c in r[1:] if c] for r in table_rows(out.read_text(), "| part | peer ms |")}
    assert {"embeddings forward", "attention backward", "of which the kernel, forward", "MLP forward", "loss backward"} < set(rows)
    assert {"optimizer", "loop", "step", "sum of the parts' medians"} < set(rows)
    for side in (0, 1):  # peer, ours
        assert rows["step"][side] > 0 and rows["step"][side + 3] == 100
        for phase in ("forward", "backward"):
            assert 0 < rows[f"of which the kernel, {phase}"][side] <= rows[f"attention {phase}"][side]


@pytest.mark.slow
def test_busy_bench_times_each_setting_idle_and_beside_a_busy_process(tmp_path):
    out = tmp_path / "busy.md"
    args = ["--config", "configs/tiny.yaml", "--settings", "default", "spin-1k", "--steps", "2", "--skip", "1", "--rounds", "1"]
    result = run("bench/busy.py", *args, "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r[0]: r for r in table_rows(out.read_text(), "| setting |")}
    assert set(rows) == {"default", "spin-1k"}
    assert rows["spin-1k"][1] == "`GOMP_SPINCOUNT=1000`" and rows["default"][4] == "+0.0%"
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows.values())


@pytest.mark.slow
def test_long_bench_times_each_side_and_stops_a_dense_one_where_its_step_would_be_too_long(tmp_path):
    out = tmp_path / "long.md"
    args = ["--seq-lens", "256", "512", "--sides", "sparse", "dense", "--max-step-s", "0.001", "--out", str(out)]
    result = run("bench/long.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert f"`python bench/long.py {' '.join(args)}`" in text and out.with_suffix(".png").exists()
    rows = table_rows(text, "| side | N |")
    assert [(side, n) for side, n, *_ in rows] == [("ours, fixed split (fp32)", "256"), ("ours, fixed split (fp32)", "512"),
                                                   ("ours, dense pattern (flash SDPA)", "256")]  # fmt: skip
    assert "ours, dense pattern (flash SDPA): stopped before N=512: a step extrapolated from N=256 as N^2" in text
    assert "- ours, fixed split (fp32): time per token ~ N^" in text
    assert "tokens/s over the peer's at N=65,536 (target >= 10): not measured in this run" in text


def test_long_bench_sets_the_step_flops_against_its_time():
    """From N = 16,384 to 2^20 the FLOPs per token of ours grow about 3x by the pattern, and 4/3 by recompute."""
    from bench import long

    rows = [
        {"side": "sparse", "n": n, "step_s": n * seconds, "working": 1, "peak": 0}
        for n, seconds in ((16384, 1e-4), (1048576, 4e-4))
    ]
    (line,) = [line for line in long.summary_lines(rows) if "FLOPs per token" in line]
    flops, rate = (float(x) for x in re.findall(r": ([\d.]+)", line))
    assert 3.5 < flops < 4.5 and rate == pytest.approx(flops / 4, abs=0.01)
