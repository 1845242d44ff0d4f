"""The Triton block-sparse kernel against the fp32 oracle: output and dq, dk, dv, on every kind of layout.

Without CUDA, conftest.py sets TRITON_INTERPRET=1 and the kernels run in Triton's interpreter on tiny shapes
(bf16 is GPU-only: the interpreter gets it wrong silently). The ``gpu`` tests check realistic shapes on CUDA.
"""

import oracle
import pytest
import torch
from oracle import random_layout, single_block_rows

from sparse_transformer.model.kernels import blocksparse
from sparse_transformer.model.kernels.blocksparse import blocksparse_attention
from sparse_transformer.model.patterns import AttentionPattern

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # of the reference's max |value|


def check_against_reference(layout: torch.Tensor, block_size: int, dtype: torch.dtype, **kwargs) -> None:
    oracle.check_against_reference(blocksparse_attention, layout, block_size, dtype, TOLERANCE[dtype], device=DEVICE, **kwargs)


LAYOUTS = {
    "dense": lambda: AttentionPattern("dense", block_size=16).layout(2, 64),
    "strided": lambda: AttentionPattern("strided", block_size=16, stride=32).layout(2, 64),
    "strided_split": lambda: AttentionPattern("strided", block_size=16, stride=32, heads="split").layout(2, 64),
    "fixed_split": lambda: AttentionPattern("fixed", block_size=16, stride=32, summary=16, heads="split").layout(2, 64),
    "random": lambda: random_layout(2, 4, 0.4, seed=1),
    "single_block_rows": lambda: single_block_rows(2, 4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_matches_reference(name: str, dtype: torch.dtype) -> None:
    check_against_reference(LAYOUTS[name](), 16, dtype)


def test_block_32_head_dim_32_and_scale() -> None:
    layout = AttentionPattern("fixed", block_size=32, stride=64, summary=32, heads="split").layout(2, 128)
    check_against_reference(layout, 32, torch.float32, B=1, D=32, scale=0.3)


def test_one_block_sequence() -> None:
    check_against_reference(torch.ones(2, 1, 1, dtype=torch.bool), 16, torch.float32)


def test_non_contiguous_inputs() -> None:
    oracle.check_non_contiguous(blocksparse_attention, LAYOUTS["strided_split"](), 16, 1e-4, device=DEVICE)


def test_backward_is_deterministic() -> None:
    layout = LAYOUTS["random"]()
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    grads = [torch.autograd.grad(blocksparse_attention(q, k, v, layout, 16).sum(), (q, k, v)) for _ in range(2)]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def _inputs(shape=(1, 2, 32, 16), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype, device=DEVICE) for _ in range(3)]


DENSE_2x2 = torch.ones(2, 2, 2, dtype=torch.bool).tril()


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: dict(a, q=a["q"][0]), r"\[B, H, N, D\]"),
        (lambda a: dict(a, k=a["k"][:, :, :16]), r"share one \[B, H, N, D\] shape"),
        (lambda a: dict(a, q=a["q"].double(), k=a["k"].double(), v=a["v"].double()), r"dtype torch.float64"),
        (lambda a: dict(a, v=a["v"].half()), r"dtypes differ"),
        (lambda a: dict(a, block_size=8), r"block_size=8 is not supported"),
        (lambda a: dict(a, q=a["q"][..., :12], k=a["k"][..., :12], v=a["v"][..., :12]), r"head dim D=12"),
        (lambda a: dict(a, block_size=32, **dict(zip("qkv", _inputs((1, 2, 48, 16))))), r"N=48 is not a multiple"),
        (lambda a: dict(a, layout=DENSE_2x2[:1]), r"layout shape \[1, 2, 2\]"),
        (lambda a: dict(a, layout=DENSE_2x2.int()), r"layout dtype torch.int32"),
        (lambda a: dict(a, layout=torch.ones(2, 2, 2, dtype=torch.bool)), r"not causal: head 0 has tile \(0, 1\)"),
        (lambda a: dict(a, layout=torch.tensor([[[1, 0], [1, 1]], [[1, 0], [1, 0]]], dtype=torch.bool)),
         r"head 1 query block 1 lacks its diagonal tile"),
    ],
    ids=["rank", "shape", "dtype", "dtype_mismatch", "block_size", "head_dim", "seq_len", "layout_shape",
         "layout_dtype", "not_causal", "missing_diagonal"],
)
def test_rejects(change, match: str) -> None:
    q, k, v = _inputs()
    args = change(dict(q=q, k=k, v=v, layout=DENSE_2x2, block_size=16))
    with pytest.raises(ValueError, match=match):
        blocksparse_attention(**args)


@pytest.mark.gpu
def test_rejects_mixed_devices() -> None:
    q, k, v = _inputs()
    with pytest.raises(ValueError, match="devices differ"):
        blocksparse_attention(q, k.cpu(), v, DENSE_2x2, 16)


def test_rejects_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blocksparse, "_INTERPRET", False)
    q, k, v = (torch.randn(1, 2, 32, 16) for _ in range(3))
    with pytest.raises(ValueError, match="needs CUDA.*'blocks' or 'reference'"):
        blocksparse_attention(q, k, v, DENSE_2x2, 16)


@pytest.mark.gpu
class TestGPU:
    """Realistic shapes on a CUDA device, layout on the CPU (the kernel moves it)."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    @pytest.mark.parametrize(
        "kind, N, D, bs",
        [("dense", 1024, 64, 64), ("strided", 2048, 64, 64), ("fixed", 4096, 128, 128), ("strided", 4096, 128, 64)],
    )
    def test_patterns(self, kind: str, N: int, D: int, bs: int, dtype: torch.dtype) -> None:
        layout = AttentionPattern(kind, block_size=bs, stride=8 * bs, summary=bs, heads="split").layout(4, N)
        check_against_reference(layout, bs, dtype, B=1, D=D)

    @pytest.mark.parametrize("bs", [16, 32, 64, 128])
    def test_block_sizes(self, bs: int) -> None:
        check_against_reference(random_layout(2, 1024 // bs, 0.3, seed=bs), bs, torch.bfloat16, D=64)

    def test_fp32_is_exact(self) -> None:
        check_against_reference(random_layout(2, 16, 0.5, seed=0), 64, torch.float32, D=64)

    def test_bf16_tiny(self) -> None:
        check_against_reference(LAYOUTS["fixed_split"](), 16, torch.bfloat16)


def test_registered_as_custom_operators_with_autograd() -> None:
    """torch.compile keeps a torch.library operator whole; its schema and autograd are what the library checks.
    (The fake-tensor check traces the kernels, which the interpreter cannot: on CUDA, test_compiled_model.)"""
    layout = LAYOUTS["strided_split"]()
    tables = blocksparse.layout_tables(layout, torch.device(DEVICE))
    q, k, v = (torch.randn(1, 2, 64, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    args = (q, k, v, tables.rows.index, tables.rows.count, tables.cols.index, tables.cols.count, 16, 0.25)
    assert torch.ops.sparse_transformer.blocksparse_forward.default is not None
    torch.library.opcheck(blocksparse._forward, args, test_utils=("test_schema", "test_autograd_registration"))


@pytest.mark.gpu
def test_compiled_model_keeps_the_kernel_whole() -> None:
    """A model on the triton backend under torch.compile: the kernels inside the compiled graph, the same
    loss and gradients as eager."""
    import dataclasses

    from sparse_transformer.model import ModelConfig, Sparse, SparseTransformer

    tables = blocksparse.layout_tables(LAYOUTS["fixed_split"](), torch.device(DEVICE))
    q, k, v = (torch.randn(1, 2, 64, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    args = (q, k, v, tables.rows.index, tables.rows.count, tables.cols.index, tables.cols.count, 16, 0.25)
    torch.library.opcheck(blocksparse._forward, args)

    pattern = AttentionPattern("fixed", block_size=64, stride=256, summary=64, heads="split")
    config = ModelConfig(d_model=128, n_layers=2, n_heads=2, pattern=pattern, attention=Sparse("triton"), seq_len=1024)
    torch.manual_seed(0)
    eager = SparseTransformer(config).to(DEVICE)
    compiled = SparseTransformer(dataclasses.replace(config, compile=True)).to(DEVICE)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randint(0, 256, (2, 1024), device=DEVICE)
    torch._dynamo.reset()
    losses = [m(x).float().logsumexp(-1).mean() for m in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-4)
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert not any("blocksparse" in reason and "_checked_tables" not in reason for reason in breaks), breaks
