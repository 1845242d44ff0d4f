"""The Sparse Transformer network and its LightningModule on tiny shapes."""

import math

import pytest
import torch

from sparse_transformer.data.text import EMBEDDED_CORPUS
from sparse_transformer.modality import Audio, Image
from sparse_transformer.model import ModelConfig, Sparse, SparseTransformer
from sparse_transformer.model.config import ConfigError
from sparse_transformer.model.patterns import AttentionPattern, PatternError
from sparse_transformer.model.transformer import PositionalEmbedding
from sparse_transformer.training.lightning_module import SparseTransformerLM, warmup_cosine

PATTERN = AttentionPattern("fixed", block_size=8, stride=16, summary=4, heads="interleaved")


def tiny(**kwargs) -> SparseTransformer:
    args = dict(seq_len=64, d_model=32, n_layers=2, n_heads=2, pattern=PATTERN, attention=Sparse("reference"))
    return SparseTransformer(ModelConfig(**{**args, **kwargs}))


def test_forward_shapes_and_short_inputs():
    model = tiny()
    assert model(torch.randint(0, 256, (3, 64))).shape == (3, 64, 256)
    # Lengths that are not a multiple of the block size are padded internally.
    assert model(torch.randint(0, 256, (2, 13))).shape == (2, 13, 256)


def test_padding_does_not_change_outputs():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randint(0, 256, (1, 24))
    torch.testing.assert_close(model(x[:, :13]), model(x)[:, :13])


def test_too_long_input_is_refused():
    with pytest.raises(ValueError, match="sequence of 65 tokens is longer than the model's context seq_len=64"):
        tiny()(torch.zeros(1, 65, dtype=torch.long))


def test_bad_pattern_for_seq_len_is_refused():
    with pytest.raises(PatternError, match="sequence length 60 is not a positive multiple of block_size=8"):
        tiny(seq_len=60)


def test_residual_projections_are_scaled_by_depth():
    torch.manual_seed(0)
    model = tiny(n_layers=8, d_model=128)
    std = model.blocks[0].attn.proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(16)) < 0.001
    assert abs(model.blocks[0].attn.qkv.weight.std().item() - 0.02) < 0.002


def test_factorized_positions_sum_one_vector_per_axis():
    pos = PositionalEmbedding((4, 4, 3), 8)
    table = pos(48)
    r, c, ch = 2, 3, 1
    expected = pos.tables[0][r] + pos.tables[1][c] + pos.tables[2][ch]
    torch.testing.assert_close(table[r * 12 + c * 3 + ch], expected)
    assert sum(p.numel() for p in pos.parameters()) == (4 + 4 + 3) * 8
    with pytest.raises(ConfigError, match=r"positions=\[4, 4\] multiply to 16, but the data's seq_len is 64"):
        tiny(positions=(4, 4))


def test_recompute_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    a = tiny(dropout=0.0)
    b = tiny(recompute=True)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 256, (2, 64))
    for m in (a, b):
        m.train()
        m(x).float().logsumexp(-1).mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)


def test_warmup_then_cosine_schedule():
    assert warmup_cosine(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 100, 0.1) == pytest.approx(0.1)


def test_overfits_a_batch_of_real_text():
    """The loss on one batch of the shipped corpus falls far below its starting 8 bits per byte."""
    torch.manual_seed(0)
    network = ModelConfig(seq_len=64, d_model=64, n_layers=2, n_heads=2, pattern=PATTERN, attention=Sparse("reference"))
    module = SparseTransformerLM(network)
    text = EMBEDDED_CORPUS.read_bytes()[:4 * 65]
    batch = torch.tensor(list(text)).view(4, 65)
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    first = module._loss(batch).item()
    for _ in range(60):
        loss = module._loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first / math.log(2) > 7.5
    assert loss.item() / math.log(2) < 1.5


def test_options_are_checked_where_they_are_declared():
    for options, message in [
        (dict(n_heads=3), "d_model=32 is not divisible by n_heads=3"),
        (dict(n_layers=0), "model n_layers=0 must be an int >= 1"),
        (dict(dropout=1.5), r"dropout=1.5 must be in \[0, 1\)"),
        (dict(attention="sparse"), "attention='sparse' is not an attention kind; use one of AdaptiveSpan, Performer, Sparse"),
    ]:
        with pytest.raises(ConfigError, match=message):
            ModelConfig(d_model=32, **options)
    with pytest.raises(ConfigError, match="attention backend 'cudnn' is not one of auto, triton"):
        Sparse("cudnn")


def test_stride_and_positions_follow_the_data_unless_set():
    strided = AttentionPattern("strided", block_size=8)
    image = Image((8, 8, 3)).resolve(ModelConfig(seq_len=192, d_model=16, n_heads=2, pattern=strided))
    assert image.pattern.stride == 24 and image.positions == (8, 8, 3)  # one row: 8 pixels x 3 channels
    assert SparseTransformer(image).config == image  # the model keeps a resolved config as it is
    wide = Image((32, 32, 3)).resolve(ModelConfig(seq_len=3072, d_model=16, n_heads=2, pattern=strided, n_layers=1))
    assert wide.pattern.stride == 96
    text = SparseTransformer(ModelConfig(seq_len=256, d_model=16, n_heads=2, pattern=strided)).config
    assert text.pattern.stride == 16 and text.positions == (256,)  # sqrt(N) in whole blocks, 1-D
    audio = Audio(8000).resolve(ModelConfig(seq_len=256, d_model=16, n_heads=2, pattern=strided))
    assert audio.pattern.stride == 16 and audio.positions == (16, 16)  # sqrt(N), and a matrix as wide as it
    text = ModelConfig(seq_len=256, d_model=16, n_heads=2, pattern=AttentionPattern("strided", block_size=8, stride=32))
    assert Audio(8000).resolve(text).positions == (8, 32) and Image((16, 16, 1)).resolve(text).pattern.stride == 32
    with pytest.raises(ConfigError, match=r"positions=\[8, 8, 3\] multiply to 192, but the data's seq_len is 3072"):
        Image((32, 32, 3)).resolve(ModelConfig(seq_len=3072, d_model=16, n_heads=2, positions=(8, 8, 3)))
    row = r"pattern stride=30 must be a positive multiple of block_size=4 \(stride 30 follows from the images\)"
    with pytest.raises(ConfigError, match=row):
        Image((10, 10, 3)).resolve(ModelConfig(seq_len=300, d_model=16, n_heads=2, pattern=AttentionPattern("strided", block_size=4)))
    with pytest.raises(ConfigError, match="pattern stride=128 is longer than the context seq_len=64"):
        tiny(pattern=AttentionPattern("strided", block_size=8, stride=128))
