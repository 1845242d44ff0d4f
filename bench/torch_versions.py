"""The same checks and timings under several PyTorch installs (one virtual environment each), alternating.

    python bench/torch_versions.py --pythons .venv/bin/python /tmp/v215/bin/python
    python bench/torch_versions.py --pythons A/bin/python B/bin/python --seq-lens 2048 --steps 4 --rounds 1

Each round runs every interpreter once, in turn, on this checkout. A run reports:

- whether torchaudio imports beside that torch and its transforms work (``mu_law_encoding``, ``resample``);
- whether compiled FlexAttention has a backward on the CPU;
- a quickstart training step (4 layers, d=192, N=256, batch 16, the ``auto`` backend, fused AdamW);
- forward + backward of the CPU backends ``cpp`` (built for that torch) and ``pieces`` (strided, split heads,
  l = sqrt(N) in blocks of 64) and of dense causal SDPA (B=1, H=8, D=64, fp32) at each N.

Medians over the rounds, written with the command to bench/results/torch-versions-cpu.md.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = ("sdpa", "cpp", "pieces")  # dense causal SDPA, then the CPU backends


def child(args: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from sparse_transformer.model import ModelConfig, Sparse, SparseTransformer
    from sparse_transformer.model.kernels import load_backend, resolve_backend
    from sparse_transformer.model.patterns import AttentionPattern
    from sparse_transformer.training.lightning_module import adamw_with_schedule

    out: dict = {"torch": torch.__version__, "auto": resolve_backend("auto", torch.device("cpu"))}
    try:
        import torchaudio
        import torchaudio.functional as AF

        wave = torch.sin(torch.linspace(0, 100, 8000)).unsqueeze(0)
        AF.resample(AF.mu_law_encoding(wave, 256).float(), 8000, 16000)
        out["torchaudio"] = f"{torchaudio.__version__}: works"
    except Exception as e:  # noqa: BLE001 (any failure is the finding)
        out["torchaudio"] = f"fails: {type(e).__name__}: {' '.join(str(e).split())[:120]}"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = (torch.randn(1, 2, 256, 64, requires_grad=True) for _ in range(3))
        mask = create_block_mask(lambda b, h, i, j: j <= i, 1, 2, 256, 256, device="cpu")
        torch.compile(flex_attention)(q, k, v, block_mask=mask).sum().backward()
        out["flex_cpu_backward"] = "yes"
    except Exception as e:  # noqa: BLE001
        out["flex_cpu_backward"] = f"no: {type(e).__name__}: {' '.join(str(e).split())[:120]}"

    torch.manual_seed(0)
    pattern = AttentionPattern("strided", block_size=32, stride=64, heads="split")
    model = SparseTransformer(ModelConfig(d_model=192, n_layers=4, n_heads=6, pattern=pattern, attention=Sparse("auto"), seq_len=256))
    optimizer, _ = adamw_with_schedule(model.parameters(), 2e-3, (0.9, 0.95), 0.01, 0, 0.1, 100)
    x = torch.randint(0, 256, (16, 257))
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        times.append(time.perf_counter() - start)
    out["step_ms"] = 1e3 * statistics.median(times[1:])

    for n in args.seq_lens:
        stride = 64 * max(round((n / 64) ** 0.5), 1)
        layout = AttentionPattern("strided", block_size=64, stride=stride, heads="split").layout(8, n)
        qkv = [torch.randn(1, 8, n, 64, requires_grad=True) for _ in range(3)]
        for name in ATTENTION:
            fn, extra = (F.scaled_dot_product_attention, {"is_causal": True}) if name == "sdpa" else (load_backend(name), {})
            args_ = qkv if name == "sdpa" else (*qkv, layout, 64)
            runs = []
            for _ in range(args.reps + 1):
                start = time.perf_counter()
                fn(*args_, **extra).sum().backward()
                runs.append(time.perf_counter() - start)
            out[f"{name}_{n}_ms"] = 1e3 * min(runs[1:])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pythons", nargs="+", help="interpreters of the virtual environments to compare")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--steps", type=int, default=6, help="quickstart steps timed per run")
    p.add_argument("--reps", type=int, default=2, help="attention calls timed per run (best kept)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "torch-versions-cpu.md")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    sys.path.insert(0, str(ROOT))
    from bench.machine import device_name, load_average
    from sparse_transformer.files import write_atomic

    started = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    load = load_average()
    flags = ["--seq-lens", *map(str, args.seq_lens), "--steps", str(args.steps), "--reps", str(args.reps), "--child"]
    results: dict[str, list[dict]] = {py: [] for py in args.pythons}
    for r in range(args.rounds):
        for py in args.pythons if r % 2 == 0 else args.pythons[::-1]:
            done = subprocess.run([py, __file__, *flags], capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                sys.exit(f"error: {py} failed:\n{done.stderr[-2000:]}")
            results[py].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r}: {py}: {results[py][-1]}", flush=True)

    timed = ["step_ms", *(f"{b}_{n}_ms" for n in args.seq_lens for b in ATTENTION)]
    lines = [
        f"# PyTorch versions on {device_name('cpu')}",
        "",
        f"- command: `{shlex.join(['python', 'bench/torch_versions.py', *sys.argv[1:]])}`",
        f"- date: {started}; float32; load before the runs: {load}; {args.rounds} rounds, each interpreter once per round",
        "",
        "| torch | torchaudio | FlexAttention CPU backward | auto | quickstart step ms | "
        + " | ".join(f"sdpa / cpp / pieces ms at {n} | cpp, pieces x sdpa" for n in args.seq_lens)
        + " |",
        "|---|---|---|---|---:|" + "---:|---:|" * len(args.seq_lens),
    ]
    for runs in results.values():
        med = {k: statistics.median(r[k] for r in runs) for k in timed}
        cells = [
            " / ".join(f"{med[f'{b}_{n}_ms']:.0f}" for b in ATTENTION)
            + " | "
            + ", ".join(f"{med[f'sdpa_{n}_ms'] / med[f'{b}_{n}_ms']:.2f}" for b in ATTENTION[1:])
            for n in args.seq_lens
        ]
        first = runs[0]
        lines.append(
            f"| {first['torch']} | {first['torchaudio']} | {first['flex_cpu_backward']} | {first['auto']} | {med['step_ms']:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += [
        "",
        "quickstart step: forward, backward, clipping and fused AdamW of the quickstart model (N=256, batch 16, "
        "strided split, the backend auto picks), the median of the run's steps. sdpa / cpp / pieces: forward + backward "
        "at B=1, H=8, D=64, the block-sparse backends on strided with split heads at l = sqrt(N) in blocks of 64, the "
        "best of the run's calls; x sdpa: how many times faster than dense causal SDPA. Medians over rounds.",
    ]
    text = "\n".join(lines) + "\n"
    write_atomic(args.out, text)
    print(f"\n{text}\nwritten to {args.out}")


if __name__ == "__main__":
    main()
