"""bench/compare.py: its config checks, and a two-variant comparison end to end through the real CLI."""

import subprocess
import sys
from pathlib import Path

import pytest

from bench import compare
from sparse_transformer.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
TWO_VARIANTS = """
configs: [configs/tiny.yaml, {trainer: {max_steps: 3, limit_val_batches: 1}}]
variants:
  strided: []
  performer: [configs/variants/performer.yaml, {model: {network: {attention: {init_args: {features: 8}}}}}]
"""


def test_overlays_become_config_arguments(tmp_path):
    args = compare.config_args(["configs/tiny.yaml", {"trainer": {"max_steps": 3}}], tmp_path)
    assert args == ["--config", "configs/tiny.yaml", "--config", str(tmp_path / "overlay-1.yaml")]
    assert (tmp_path / "overlay-1.yaml").read_text() == "trainer:\n  max_steps: 3\n"
    assert compare.overlays_text(["configs/variants/performer.yaml", {"model": {"network": {"pattern": {"kind": "dense"}}}}]) == (
        "configs/variants/performer.yaml; pattern.kind=dense"
    )


@pytest.mark.parametrize(
    "text,message",
    [
        ("configs: [configs/tiny.yaml]\nvariant: {}\n", r"unknown keys \['variant'\]"),
        ("configs: [configs/none.yaml]\nvariants: {a: []}\n", "'configs' names 'configs/none.yaml', which is not a file"),
        ("configs: [configs/tiny.yaml]\nvariants: {}\n", "'variants' must map names to lists of overlays"),
        ("configs: [configs/tiny.yaml]\nvariants: {a: 3}\n", "'a' must be a list of train.py configs"),
        ("configs: []\nvariants: {a: []}\n", "'configs' must name at least the base"),
    ],
)
def test_bad_compare_configs_are_named(text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        compare.load_config(path)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/compare.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_variants_train_and_are_tabulated(tmp_path):
    config = tmp_path / "two.yaml"
    config.write_text(TWO_VARIANTS)
    out = tmp_path / "table.md"
    done = run("--config", str(config), "--out", str(out), "--root", str(tmp_path / "runs"))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith(("| strided", "| performer"))]
    assert [r[0] for r in rows] == ["| strided", "| performer"]
    for r in rows:
        params, bpb, tokens_per_s = int(r[2].replace(",", "")), float(r[3]), float(r[4].replace(",", ""))
        assert params > 0 and 0 < bpb < 9 and tokens_per_s > 0
    assert "- command: `python bench/compare.py --config" in out.read_text()
    assert (tmp_path / "runs" / "performer" / "checkpoints" / "last.ckpt").is_file()
    assert "plot: `table.png`" in out.read_text() and out.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_bad_variant_stops_with_one_line_naming_it(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("configs: [configs/tiny.yaml]\nvariants:\n  bad: [{model: {network: {attention: Performer}}}]\n")
    done = run("--config", str(config), "--out", str(tmp_path / "t.md"), "--root", str(tmp_path / "runs"))
    assert done.returncode == 2 and not (tmp_path / "t.md").exists()
    assert done.stderr.strip().startswith("error: variant 'bad': attention 'performer' is global causal linear attention")
    assert "Traceback" not in done.stderr
