"""The byte-text DataModule and enwik8 preparation, on files the tests write."""

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

import sparse_transformer.data.text as text
from sparse_transformer.data.download import Remote
from sparse_transformer.data.text import ByteTextDataModule, Enwik8DataModule
from sparse_transformer.errors import InputError


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "bytes.bin"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes, byte i at position i mod 256
    return path


def test_splits_are_contiguous_and_windows_align(corpus):
    dm = ByteTextDataModule(path=str(corpus), seq_len=32, batch_size=4, split=(0.8, 0.1, 0.1))
    dm.setup()
    assert dm.train.starts == range(0, 8192 - 32)
    assert dm.val.starts == range(8192, 9216 - 32, 32)
    assert dm.test.starts == range(9216, 10240 - 32, 32)
    window = dm.val[1]
    assert window.shape == (33,) and window.dtype == torch.long
    assert window.tolist() == [(8192 + 32 + i) % 256 for i in range(33)]
    # Consecutive validation windows share exactly one byte: the last target is the next input.
    assert dm.val[0][-1] == dm.val[1][0]


def test_training_windows_are_random_but_reproducible(corpus):
    def first_batches(seed):
        dm = ByteTextDataModule(path=str(corpus), seq_len=16, batch_size=4, samples_per_epoch=12, seed=seed)
        dm.setup()
        return torch.cat(list(dm.train_dataloader()))

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert a.shape == (12, 17)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Every window is a run of consecutive bytes of the file.
    assert ((a[:, 1:] - a[:, :-1]) % 256 == 1).all()


def test_workers_give_the_same_batches(corpus):
    dm = ByteTextDataModule(path=str(corpus), seq_len=16, batch_size=4, num_workers=2)
    dm.setup()
    serial = ByteTextDataModule(path=str(corpus), seq_len=16, batch_size=4)
    serial.setup()
    assert torch.equal(torch.cat(list(dm.val_dataloader())), torch.cat(list(serial.val_dataloader())))


def test_default_is_the_shipped_corpus():
    dm = ByteTextDataModule(seq_len=64)
    dm.setup()
    size = dm.path.stat().st_size
    assert dm.path == text.EMBEDDED_CORPUS and size > 400_000
    assert len(dm.train) == round(0.9 * size) - 64


def test_missing_and_short_files_fail_clearly(tmp_path, corpus):
    with pytest.raises(InputError, match="data file .*missing.bin not found"):
        ByteTextDataModule(path=str(tmp_path / "missing.bin")).setup()
    short = tmp_path / "short.bin"
    short.write_bytes(b"x" * 100)
    with pytest.raises(InputError, match="train split of .*short.bin \\(100 bytes.*shorter than seq_len \\+ 1 = 96"):
        ByteTextDataModule(path=str(short), seq_len=95).setup()
    with pytest.raises(InputError, match=r"data split \[0.5, 0.5, 0.5\] must be three non-negative fractions"):
        ByteTextDataModule(path=str(corpus), split=(0.5, 0.5, 0.5))


def test_enwik8_missing_without_download(tmp_path):
    dm = Enwik8DataModule(root=str(tmp_path))
    dm.prepare_data()  # without download: nothing to do; every rank checks in setup
    with pytest.raises(InputError, match="enwik8 not found at .*download=true"):
        dm.setup()


def test_enwik8_wrong_size_or_hash_is_refused(tmp_path, monkeypatch):
    (tmp_path / "enwik8").write_bytes(b"not wikipedia")
    with pytest.raises(InputError, match="has 13 bytes, enwik8 has 100000000"):
        Enwik8DataModule(root=str(tmp_path)).setup()
    monkeypatch.setattr(text, "ENWIK8_SIZE", 13)
    with pytest.raises(InputError, match="has md5 .*, enwik8 has a1fa5ffd"):
        Enwik8DataModule(root=str(tmp_path)).setup()


def test_enwik8_download_unpacks_verifies_and_splits(tmp_path, monkeypatch):
    """The real download path, fed a local zip instead of mattmahoney.net."""
    payload = bytes(range(256)) * 400
    archive = tmp_path / "enwik8.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("enwik8", payload)
    sha256 = hashlib.sha256(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(text, "ENWIK8_ZIP", Remote(archive.as_uri(), archive.stat().st_size, f"sha256:{sha256}"))
    monkeypatch.setattr(text, "ENWIK8_SIZE", len(payload))
    monkeypatch.setattr(text, "ENWIK8_MD5", hashlib.md5(payload).hexdigest())
    root = tmp_path / "datasets"
    dm = Enwik8DataModule(root=str(root), download=True, seq_len=32)
    dm.prepare_data()
    assert (root / "enwik8").read_bytes() == payload
    assert sorted(p.name for p in root.iterdir()) == ["enwik8"]  # no temporary left behind
    dm.setup()
    assert dm.val.starts.start == round(0.9 * len(payload)) and dm.test.starts.start == round(0.95 * len(payload))
