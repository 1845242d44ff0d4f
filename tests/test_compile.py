"""``model.network.compile``: blocks through torch.compile compute what eager blocks do, on the CPU backends."""

import dataclasses

import pytest
import torch

from sparse_transformer.model import ModelConfig, Sparse, SparseTransformer
from sparse_transformer.model.patterns import AttentionPattern

pytestmark = pytest.mark.slow  # a compile takes tens of seconds on 2 cores


@pytest.mark.parametrize("backend", ["cpp", "pieces"])
def test_compiled_blocks_train_like_eager_and_keep_the_checkpoint_keys(backend):
    pattern = AttentionPattern("strided", block_size=16, stride=32, heads="split")
    config = ModelConfig(seq_len=64, d_model=32, n_layers=2, n_heads=2, pattern=pattern, attention=Sparse(backend))
    torch.manual_seed(0)
    eager = SparseTransformer(config)
    compiled = SparseTransformer(dataclasses.replace(config, compile=True))
    assert list(compiled.state_dict()) == list(eager.state_dict())  # compiled views are not parameters of their own
    compiled.load_state_dict(eager.state_dict())
    x = torch.randint(0, 256, (2, 64))
    losses = [m(x).logsumexp(-1).mean() for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0])
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
    # Decoding with a cache runs the blocks eagerly, and agrees with the compiled forward.
    compiled.eval()
    with torch.no_grad():
        caches = compiled.new_caches()
        prefill = compiled(x[:, :32], caches)
        step = compiled.decode(x[:, 32:33], 32, caches)
        full = compiled(x[:, :33])
    torch.testing.assert_close(prefill, full[:, :32], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step, full[:, 32], rtol=1e-4, atol=1e-5)
