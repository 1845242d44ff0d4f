"""Incremental decoding with the key/value cache against full recomputation, generation longer than the context,
and sampling's refusals."""

import pytest
import torch

from sparse_transformer.errors import InputError
from sparse_transformer.model import AttentionPattern, HourglassConfig, ModelConfig, Sparse, SparseTransformer
from sparse_transformer.model.kv_cache import BlockKVCache
from sparse_transformer.sampling import Sampling, generate, slide_of, window_start

PATTERNS = {
    "dense": AttentionPattern("dense", block_size=4),
    "local": AttentionPattern("local", block_size=4, stride=8),
    "strided-split": AttentionPattern("strided", block_size=4, stride=8, heads="split"),
    "strided-merged": AttentionPattern("strided", block_size=4, stride=8, heads="merged"),
    "fixed-interleaved": AttentionPattern("fixed", block_size=4, stride=8, summary=2, heads="interleaved"),
}


def tiny(pattern: AttentionPattern, backend: str = "reference", memory: int = 0, **kwargs) -> SparseTransformer:
    torch.manual_seed(0)
    attention = Sparse(backend, persistent_memory=memory)
    model = SparseTransformer(ModelConfig(seq_len=48, d_model=32, n_layers=3, n_heads=4, pattern=pattern, attention=attention, **kwargs))
    return model.eval()


@pytest.mark.parametrize("memory", [0, 8])
@pytest.mark.parametrize("backend", ["reference", "blocks", "cpp", "pieces"])
@pytest.mark.parametrize("prompt_len", [1, 8, 11])
@pytest.mark.parametrize("name", PATTERNS)
def test_cached_logits_match_full_recompute(name, prompt_len, backend, memory):
    model = tiny(PATTERNS[name], backend, memory)
    seq = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(seq)  # (B, N, vocab): logits at every position from the whole sequence
        caches = model.new_caches()
        torch.testing.assert_close(model(seq[:, :prompt_len], caches), full[:, :prompt_len], rtol=1e-4, atol=1e-4)
        for pos in range(prompt_len, 48):
            step = model.decode(seq[:, pos : pos + 1], pos, caches)
            torch.testing.assert_close(step, full[:, pos], rtol=1e-4, atol=1e-4, msg=f"position {pos}")


@pytest.mark.parametrize("name", PATTERNS)
def test_generate_with_and_without_cache_gives_the_same_tokens(name):
    model = tiny(PATTERNS[name])
    prompt = torch.tensor([[72, 101, 108], [108, 111, 32]])
    for temperature, top_k in [(0.0, None), (1.0, 20)]:
        cached, recomputed = (generate(model, prompt, 40, Sampling(temperature, top_k, 3, kv_cache=kv)) for kv in (True, False))
        assert cached.shape == (2, 43) and torch.equal(cached[:, :3], prompt)
        assert torch.equal(cached, recomputed)


def test_hourglass_samples_by_full_recompute():
    model = tiny(PATTERNS["strided-split"], hourglass=HourglassConfig("1@1 1@2 1@1"))
    assert not model.supports_kv_cache
    prompt = torch.tensor([[72, 101, 108]])
    out = generate(model, prompt, 20, Sampling(0.0))
    assert torch.equal(out, generate(model, prompt, 20, Sampling(0.0, kv_cache=False))) and out.shape == (1, 23)
    manual = prompt
    for _ in range(20):  # greedy by hand: the argmax of the full forward at the last position
        manual = torch.cat([manual, model(manual)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, manual)


def test_cache_keeps_only_the_blocks_later_queries_read():
    for name in PATTERNS:
        model = tiny(PATTERNS[name])
        caches = model.new_caches()
        with torch.no_grad():
            model(torch.zeros(1, 47, dtype=torch.long), caches)
            model.decode(torch.zeros(1, 1, dtype=torch.long), 47, caches)
        for cache in caches:
            # At the last query block nothing later can read anything: exactly its own row's blocks remain.
            read = cache.layout.to_dense()[:, -1].any(0).nonzero().flatten().tolist()
            assert sorted(cache.blocks) == read
            assert len(read) == 12 if name == "dense" else len(read) < 12, (name, read)


def test_the_cache_reuses_the_slots_of_the_blocks_it_drops():
    """A fixed layer drops each chunk once behind it: over 256 blocks its pool stays at the live ones (doubled)."""
    layout = AttentionPattern("fixed", block_size=4, stride=32, summary=4, heads="split").layout(2, 1024)
    cache, key = BlockKVCache(layout, 4), torch.randn(1, 2, 1, 8)
    most = 0
    for pos in range(1024):
        cache.write(key, key, pos)
        cache.attend(key, pos)
        most = max(most, cache.stored_blocks())
    full = 256 * 2 * key.nbytes * 4  # every block's keys and values
    assert most < 256 // 4 and cache.peak_bytes < full / 2


def sliding_by_hand(model: SparseTransformer, prompt: torch.Tensor, length: int, shift: int) -> torch.Tensor:
    """The reference: greedy, each token from a full forward pass over its window, the window's start a
    multiple of ``shift`` and its length at most the context."""
    out = prompt
    for _ in range(length):
        t = out.shape[1]
        start = 0 if t <= model.seq_len else shift * -(-(t - model.seq_len) // shift)
        out = torch.cat([out, model(out[:, start:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize("slide", [None, 4, 20, 48])
@pytest.mark.parametrize("name", ["strided-split", "fixed-interleaved", "dense"])
def test_generation_longer_than_the_context_equals_the_sliding_reference(name, slide):
    """4x the context, greedy: the cache refilled at every slide gives the reference's tokens exactly."""
    model = tiny(PATTERNS[name])
    prompt = torch.tensor([[72, 101, 108], [108, 111, 32]])
    shift = slide_of(model, slide)
    assert shift % model.block_size == 0 and shift <= model.seq_len
    out = generate(model, prompt, 4 * 48, Sampling(0.0, slide=slide))
    assert out.shape == (2, 3 + 4 * 48)
    assert torch.equal(out, sliding_by_hand(model, prompt, 4 * 48, shift))


def test_a_prompt_longer_than_the_context_keeps_its_last_window():
    model = tiny(PATTERNS["strided-split"], memory=4)
    prompt = torch.randint(0, 256, (1, 130), generator=torch.Generator().manual_seed(0))
    out = generate(model, prompt, 30, Sampling(0.0))
    assert torch.equal(out, generate(model, prompt, 30, Sampling(0.0, kv_cache=False)))
    assert torch.equal(out, sliding_by_hand(model, prompt, 30, slide_of(model, None)))


def test_models_without_a_cache_slide_too():
    model = tiny(PATTERNS["strided-split"], hourglass=HourglassConfig("1@1 1@2 1@1"))
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, prompt, 100, Sampling(0.0)), sliding_by_hand(model, prompt, 100, slide_of(model, None)))


def test_window_starts_move_by_whole_slides():
    assert [window_start(t, 48, 12) for t in (1, 48, 49, 60, 61, 72, 73)] == [0, 0, 12, 12, 24, 24, 36]


@pytest.mark.parametrize(
    "prompt,length,message",
    [
        (torch.zeros(1, 0, dtype=torch.long), 5, r"prompt has shape \[1, 0\]; give at least one token"),
        (torch.tensor([[3, 300]]), 5, r"prompt token 300 is outside the model's vocabulary 0..255"),
        (torch.tensor([[3, -1]]), 5, r"prompt token -1 is outside the model's vocabulary 0..255"),
        (torch.zeros(1, 4, dtype=torch.long), 0, r"length=0 must be >= 1"),
    ],
)
def test_bad_sampling_requests_are_refused(prompt, length, message):
    with pytest.raises(InputError, match=message):
        generate(tiny(PATTERNS["dense"]), prompt, length)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(temperature=-0.5), r"temperature=-0.5 must be a number >= 0 \(0 is greedy\)"),
        (dict(temperature=float("nan")), r"temperature=nan must be a number >= 0"),
        (dict(top_k=0), r"top_k=0 must be >= 1"),
        (dict(slide=0), r"slide=0 must be >= 1 token"),
    ],
)
def test_bad_sampling_options_are_refused(options, message):
    with pytest.raises(InputError, match=message):
        Sampling(**options)
