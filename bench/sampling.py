"""Benchmark sampling: the key/value cache against re-running the whole prefix every step, and the cost of
generating past the context.

    python bench/sampling.py                                  # CPU or CUDA, N = 1024 2048 4096
    python bench/sampling.py --seq-lens 512 --new-tokens 16   # quick

The model is random (speed does not depend on the weights): the quickstart's width and depth by default.
Each row primes with ``N - new_tokens`` tokens and generates ``new_tokens``, so both methods decode at the end
of the context where sampling is slowest. The cache's prefill (one forward pass over the prompt, paid once per
sample) is timed on its own and not counted in its tokens/s; "cached blocks" is how many key blocks per layer
the cache holds at the end, out of N / block_size.

The second table generates ``--past`` times the context (default 2x and 4x, from a one-token prompt) with the
window sliding by ``--slides`` tokens (default a quarter of the context, the sampler's default), and counts
the prefills: one to fill the context, then one per slide. "prefill share" is the part of the wall time they
took.
The tables are printed and written as Markdown, with the command, to bench/results/sampling-<device>.md.

``--whole N [N ...]`` measures instead what sample.py does at the paper's lengths (written to
bench/results/sampling-long-<device>.md):

    python bench/sampling.py --whole 4096 65536               # configs/audio-long.yaml's pattern at 4k and 65k

Each row generates one whole context of N tokens from the start token at temperature 1, with the pattern rule of
configs/audio-long.yaml at every N (strided, heads split, block ``--whole-block-size``, stride sqrt(N) counted in
blocks) and the positions the audio DataModule gives it, (N / stride, stride); ``--whole-patterns fixed`` adds the
fixed pattern with the same stride (summary half a block) for its cache. Per row: the time, tokens/s, the time
per token against the first N's, and the cache's peak: each layer's most bytes held at once (its pool of blocks,
free slots included, and the buffer a row's keys are gathered into: ``BlockKVCache.peak_bytes``), summed over
layers, against a full cache (every key and value of every layer: layers x 2 x N x d_model x 4 bytes). An N given
twice is measured twice: on a busy machine, ``--whole 4096 65536 4096`` shows how far the load moved the first.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from sparse_transformer import threads  # noqa: E402

threads.configure()  # OpenMP's spin-wait as sample.py sets it, before torch loads

import torch  # noqa: E402

from bench.machine import device_name, load_average  # noqa: E402
from sparse_transformer.files import write_atomic  # noqa: E402
from sparse_transformer.modality import START, Audio  # noqa: E402
from sparse_transformer.model import AttentionPattern, ModelConfig, SparseTransformer  # noqa: E402
from sparse_transformer.sampling import Sampling, generate  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per row")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--past-seq-len", type=int, default=1024, help="context of the generation past it")
    p.add_argument("--past", type=int, nargs="+", default=[2, 4], help="lengths generated, in contexts")
    p.add_argument("--slides", type=int, nargs="+", default=[None], help="window steps in tokens (default: N/4)")
    p.add_argument("--whole", type=int, nargs="+", default=None, metavar="N",
                   help="instead: generate one whole context at each N, as sample.py does")  # fmt: skip
    p.add_argument("--whole-block-size", type=int, default=64, help="--whole: the block size (configs/audio-long.yaml's)")
    p.add_argument("--whole-patterns", nargs="+", choices=("strided", "fixed"), default=["strided"], help="--whole: the patterns")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/sampling[-long]-<device>.md")
    return p.parse_args()


def decode(model: SparseTransformer, token: torch.Tensor, positions: range, caches: list) -> None:
    for pos in positions:
        model.decode(token, pos, caches)


@torch.no_grad()
def timed(fn: Callable[[], object], device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def random_model(args: argparse.Namespace, n: int, pattern: AttentionPattern) -> SparseTransformer:
    torch.manual_seed(0)
    config = ModelConfig(seq_len=n, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, pattern=pattern)
    return SparseTransformer(config).to(args.device).eval()


class Prefills:
    """Counts and times the model's full forward passes (prefills; decoding a token does not call forward), and
    keeps the caches each fills."""

    def __init__(self, model: SparseTransformer, device: str):
        self.count, self.seconds, self.device = 0, 0.0, device
        self.caches: list[list] = []
        model.register_forward_pre_hook(self.before)
        model.register_forward_hook(self.after)

    def before(self, module: SparseTransformer, args: tuple) -> None:
        self.count += 1
        if len(args) > 1 and args[1] is not None:
            self.caches.append(args[1])
        self.started = time.perf_counter()

    def after(self, *_) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self.started


def past_the_context(args: argparse.Namespace, patterns: dict[str, AttentionPattern]) -> list[tuple]:
    """Generate ``--past`` contexts' worth of tokens from one token, the window sliding: prefills and speed."""
    rows, n = [], args.past_seq_len
    for name, pattern in patterns.items():
        for slide in args.slides:
            for contexts in args.past:
                model = random_model(args, n, pattern)
                prefills = Prefills(model, args.device)
                prompt = torch.zeros(args.batch, 1, dtype=torch.long, device=args.device)
                length = contexts * n
                sampling = Sampling(temperature=0, slide=slide)
                seconds = timed(partial(generate, model, prompt, length, sampling), args.device)
                step = slide or n // 4
                rows.append((n, name, length, step, prefills.count, prefills.count / length,
                             args.batch * length / seconds, prefills.seconds / seconds))  # fmt: skip
                print(f"N={n} {name} {length} tokens, slide {step}: {prefills.count} prefills, "
                      f"{args.batch * length / seconds:.1f} tok/s", flush=True)  # fmt: skip
    return rows


def whole_contexts(args: argparse.Namespace) -> list[tuple]:
    """One whole context at each N from the start token, as sample.py generates audio: speed and the cache's peak."""
    rows, bs = [], args.whole_block_size
    for name in args.whole_patterns:
        for n in args.whole:
            stride = bs * max(1, round((n / bs) ** 0.5))  # sqrt(N) counted in blocks
            summary = {"summary": bs // 2} if name == "fixed" else {}
            pattern = AttentionPattern(name, block_size=bs, stride=stride, heads="split", **summary)
            config = ModelConfig(seq_len=n, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, pattern=pattern)
            torch.manual_seed(0)
            model = SparseTransformer(Audio(16_000).resolve(config)).to(args.device).eval()
            prefills = Prefills(model, args.device)
            prompt = torch.full((args.batch, 1), START, device=args.device)
            seconds = timed(partial(generate, model, prompt, n - 1, Sampling(temperature=1.0)), args.device)
            (caches,) = prefills.caches
            peak = sum(cache.peak_bytes for cache in caches)
            full = args.layers * 2 * n * args.d_model * 4 * args.batch
            rows.append((name, n, stride, seconds, args.batch * (n - 1) / seconds, seconds / (n - 1), peak, full))
            print(f"N={n} {name}: {seconds:.1f} s, {args.batch * (n - 1) / seconds:.1f} tok/s, cache peak "
                  f"{peak / 2**20:.1f} MiB of a full {full / 2**20:.1f} MiB", flush=True)  # fmt: skip
    return rows


def main() -> None:
    args = parse_args()
    if args.whole:
        write_whole(args, whole_contexts(args))
        return
    patterns = {
        "dense": AttentionPattern("dense", block_size=args.block_size),
        "strided": AttentionPattern("strided", block_size=args.block_size, stride=args.stride, heads="split"),
        "fixed": AttentionPattern("fixed", block_size=args.block_size, stride=args.stride, summary=args.block_size),
    }
    rows = []
    for n in args.seq_lens:
        for name, pattern in patterns.items():
            model = random_model(args, n, pattern)
            prompt = torch.randint(0, 256, (args.batch, n - args.new_tokens), device=args.device)
            caches = model.new_caches()
            prefill = timed(partial(model, prompt, caches), args.device)
            cached = timed(partial(decode, model, prompt[:, -1:], range(n - args.new_tokens, n), caches), args.device)
            recompute = timed(partial(generate, model, prompt, args.new_tokens, Sampling(0, kv_cache=False)), args.device)
            tok = args.batch * args.new_tokens
            blocks = f"{caches[0].stored_blocks()} / {n // args.block_size}"
            rows.append((n, name, prefill * 1e3, tok / cached, tok / recompute, recompute / cached, blocks))
            print(f"N={n} {name}: cached {tok / cached:.1f} tok/s, recompute {tok / recompute:.1f} tok/s", flush=True)
    write(args, rows, past_the_context(args, patterns))


def write(args: argparse.Namespace, rows: list[tuple], past: list[tuple]) -> None:
    device = device_name(args.device)
    lines = [
        f"# Sampling: key/value cache vs full recompute on {device}",
        "",
        f"- command: `{shlex.join(['python', 'bench/sampling.py', *sys.argv[1:]])}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}",
        f"- model: d_model={args.d_model}, {args.layers} layers, {args.heads} heads, block {args.block_size}, "
        f"stride {args.stride}, batch {args.batch}, float32, default attention backend; greedy; "
        f"{args.new_tokens} tokens generated at the end of the context",
        "",
        "| N | pattern | prefill ms | cached decode tok/s | recompute tok/s | speed-up | cached blocks / layer |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for n, name, prefill, cached, recompute, ratio, blocks in rows:
        lines.append(f"| {n} | {name} | {prefill:.0f} | {cached:.1f} | {recompute:.1f} | {ratio:.1f}x | {blocks} |")
    lines += [
        "",
        f"## Past the context: N={args.past_seq_len}, from a one-token prompt, greedy, key/value cache",
        "",
        "| N | pattern | tokens generated | slide | prefills | prefills / token | tok/s | prefill share |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, name, length, slide, count, per_token, rate, share in past:
        lines.append(f"| {n} | {name} | {length} | {slide} | {count} | {per_token:.4f} | {rate:.1f} | {share:.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or Path(__file__).parent / "results" / f"sampling-{args.device.split(':')[0]}.md"
    write_atomic(out, text)


def write_whole(args: argparse.Namespace, rows: list[tuple]) -> None:
    device = device_name(args.device)
    lines = [
        f"# Sampling a whole context at the paper's lengths on {device}",
        "",
        f"- command: `{shlex.join(['python', 'bench/sampling.py', *sys.argv[1:]])}`",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; load average "
        f"{load_average()} at the end",
        f"- model: d_model={args.d_model}, {args.layers} layers, {args.heads} heads, random weights, batch {args.batch}, "
        f"float32, default attention backend; heads split, block {args.whole_block_size}, stride sqrt(N) in blocks, "
        "positions (N / stride, stride); one whole context from the start token at temperature 1, with the "
        "key/value cache",
        "- cache peak: each layer's most bytes held at once (its pool of blocks, free slots included, and the buffer a "
        "row's keys and values are gathered into), summed over layers; full cache: layers x 2 x N x d_model x 4 bytes",
        "",
        "| pattern | N | stride | seconds | tok/s | ms / token | vs first N | cache peak MiB | full cache MiB | peak / full |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    first: dict[str, float] = {}
    for name, n, stride, seconds, rate, per_token, peak, full in rows:
        base = first.setdefault(name, per_token)
        lines.append(
            f"| {name} | {n} | {stride} | {seconds:.1f} | {rate:.1f} | {per_token * 1e3:.2f} | {per_token / base:.2f}x "
            f"| {peak / 2**20:.1f} | {full / 2**20:.1f} | {peak / full:.2f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or Path(__file__).parent / "results" / f"sampling-long-{args.device.split(':')[0]}.md"
    write_atomic(out, text)


if __name__ == "__main__":
    main()
