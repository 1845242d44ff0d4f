"""Backends tried before they are trusted (``kernels/selfcheck.py``): the Triton kernel's first-call check on CUDA,
with its two outcomes simulated here on the CPU (a kernel that does not compile, one that computes wrong), and
the config-time try of a backend in a precision."""

import contextlib
import re

import pytest
import torch

from sparse_transformer.errors import InputError
from sparse_transformer.model.kernels import blocksparse, get_backend, load_backend, selfcheck
from sparse_transformer.model.kernels.reference import reference_attention

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch):
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.setattr(selfcheck, "_fell_back", set())


def inputs(D: int = 16, block_size: int = 16):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4 * block_size, D) for _ in range(3))
    return q, k, v, torch.ones(2, 4, 4, dtype=torch.bool).tril(), block_size


def test_on_cuda_the_triton_kernel_is_given_checked():
    assert get_backend("auto", CUDA) is selfcheck.triton_or_flex
    assert get_backend("triton", CUDA) is selfcheck.verified_triton
    assert get_backend("triton", torch.device("cpu")) is blocksparse.blocksparse_attention  # the interpreter: unchecked


def test_the_real_kernel_passes_its_check():
    """Under the interpreter here (conftest.py); on a GPU the same check runs on the compiled kernel."""
    assert selfcheck.disagreement(load_backend("triton"), torch.device("cpu"), torch.float32, 16, 16) is None


def does_not_compile(*args, **kwargs):
    raise RuntimeError("PTX assembly aborted due to errors")


def computes_wrong(q, k, v, layout, block_size, scale=None):
    return reference_attention(q, k, v, layout, block_size, scale) * 1.5


@pytest.mark.parametrize(
    "broken,problem",
    [(does_not_compile, "RuntimeError: PTX assembly aborted due to errors"), (computes_wrong, "its output differs from the reference by ")],
    ids=["does-not-compile", "computes-wrong"],
)
def test_a_broken_kernel_stops_a_run_that_asked_for_it_and_falls_back_under_auto(monkeypatch, capsys, broken, problem):
    monkeypatch.setattr(blocksparse, "blocksparse_attention", broken)
    q, k, v, layout, bs = inputs()
    where = "cpu (cpu) for float32, head dim 16, block size 16"
    with pytest.raises(InputError, match=rf"the triton backend failed its check on {re.escape(where)}: {re.escape(problem)}.*; use backend flex or auto"):
        selfcheck.verified_triton(q, k, v, layout, bs)
    with torch.no_grad():  # flex has no backward on the CPU; on CUDA it trains
        out = selfcheck.triton_or_flex(q, k, v, layout, bs)
        again = selfcheck.triton_or_flex(q, k, v, layout, bs)
    torch.testing.assert_close(out, reference_attention(q, k, v, layout, bs), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, out)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: the triton backend failed its check on {where}: {problem}")
    assert warnings[0].endswith("; using flex instead")


def test_the_verdict_is_kept_per_device_dtype_and_shape(monkeypatch):
    calls = []
    monkeypatch.setattr(selfcheck, "disagreement", lambda *args: calls.append(args[1:]) or None)
    monkeypatch.setattr(blocksparse, "blocksparse_attention", lambda q, k, v, layout, bs, scale=None: q)
    q, k, v, layout, bs = inputs()
    for _ in range(3):
        selfcheck.triton_or_flex(q, k, v, layout, bs)
    selfcheck.triton_or_flex(q.double(), k.double(), v.double(), layout, bs)
    assert calls == [(torch.device("cpu"), torch.float32, 16, 16), (torch.device("cpu"), torch.float64, 16, 16)]


def test_trying_a_backend_names_what_it_cannot_do():
    cpu = torch.device("cpu")
    assert selfcheck.try_backend(load_backend("blocks"), cpu, torch.float32, 16, 8) is None
    assert selfcheck.try_backend(load_backend("flex"), cpu, torch.float32, 16, 8).startswith(
        "NotImplementedError: the flex backend has no backward on CPU"
    )

    def fp32_only(q, k, v, layout, block_size, scale=None):
        if torch.get_default_dtype() != torch.float32:
            raise TypeError(f"made a {torch.get_default_dtype()} buffer")
        return q * 1.0

    @contextlib.contextmanager
    def bf16_default():  # what Lightning's bf16-true does around the forward
        torch.set_default_dtype(torch.bfloat16)
        try:
            yield
        finally:
            torch.set_default_dtype(torch.float32)

    assert selfcheck.try_backend(fp32_only, cpu, torch.bfloat16, 16, 8) is None
    assert selfcheck.try_backend(fp32_only, cpu, torch.bfloat16, 16, 8, context=bf16_default) == (
        "TypeError: made a torch.bfloat16 buffer"
    )
