"""What a run shows: the progress line (live on a terminal, plain lines elsewhere), a line per validation, the model
line and the summary; and that the third-party noise a run used to print is gone."""

import io
import os
import logging
import re
import warnings

import lightning as L
import torch
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel

from sparse_transformer import terminal
from sparse_transformer.terminal import StatusLine, clock, quiet_third_party
from sparse_transformer.training.progress import RunProgress, RunSummary, TrainingClock, describe


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def screen_lines(text: str) -> list[str]:
    """What a terminal keeps of each rewrite: the text between carriage returns and newlines, escapes removed."""
    return [part for part in re.split(r"[\r\n]", text.replace("\x1b[K", "")) if part]


def test_clock():
    assert clock(0) == "0:00" and clock(75) == "1:15" and clock(3725) == "1:02:05" and clock(float("inf")) == "?"


def test_a_live_line_fits_the_terminal_with_its_bar(monkeypatch):
    monkeypatch.setattr(terminal.shutil, "get_terminal_size", lambda fallback: os.terminal_size((80, 24)))
    stream = Terminal()
    status = StatusLine(stream=stream)
    status.update("step 340/600", "10,412 tok/s  loss 2.912  val 2.953  1:02<0:48", 340 / 600, force=True)
    (line,) = screen_lines(stream.getvalue())
    assert len(line) <= 79 and line.startswith("step 340/600 ━") and "57%" in line and line.endswith("1:02<0:48")
    status.update("step 123456/500000", "1,234,567 tok/s  loss 2.912  val 2.953  12:01:02<40:00:00", 0.25, force=True)
    assert all(len(line) <= 79 for line in screen_lines(stream.getvalue()))  # no room for the bar: cut, never wrapped


def test_a_live_line_is_rewritten_at_most_four_times_a_second_and_cleared_before_a_line_that_stays():
    stream = Terminal()
    status = StatusLine(stream=stream)
    for step in range(100):
        status.update(f"step {step}", "")
    assert stream.getvalue().count("\r") == 1  # the rest came within REFRESH of the first
    status.print("step 99  val_bpb 2.953")
    assert stream.getvalue().endswith("\r\x1b[Kstep 99  val_bpb 2.953\n")


def test_plain_lines_when_not_a_terminal_at_the_interval():
    stream = io.StringIO()
    status = StatusLine(every=3600, stream=stream)
    for step in range(100):
        status.update(f"step {step}/100", "loss 2.000", step / 100)
    assert stream.getvalue() == "step 0/100 (0%)  loss 2.000\n"  # the first at once, the next an hour later
    status.update("step 99/100", "loss 1.000", 0.99, force=True)
    assert stream.getvalue().splitlines()[-1] == "step 99/100 (99%)  loss 1.000" and "\r" not in stream.getvalue()


def test_the_training_clock_leaves_out_the_time_between_batches_it_is_not_told_of(monkeypatch):
    now = iter([0.0, 1.0, 2.0, 100.0, 101.0])
    monkeypatch.setattr("sparse_transformer.training.progress.time.perf_counter", lambda: next(now))
    clock_ = TrainingClock()
    clock_.resume()  # 0
    clock_.batch(1000)  # 1
    clock_.batch(1000)  # 2; a validation runs until 100
    clock_.resume()  # 100
    clock_.batch(1000)  # 101
    assert clock_.mean_rate() == 1000.0 and clock_.rate() == 1000.0 and clock_.steps_per_second() == 1.0


class LoggingModel(BoringModel):
    """BoringModel that logs a training and a validation metric as the project's module does."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.log("train_bpb", out["loss"], prog_bar=True, on_step=True, on_epoch=True)
        return out

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("val_bpb", out["x"], prog_bar=True)
        return out


def fit(tmp_path, callbacks, **limits) -> L.Trainer:
    trainer = L.Trainer(callbacks=callbacks, logger=False, default_root_dir=tmp_path, enable_model_summary=False, **limits)
    trainer.fit(LoggingModel())
    return trainer


def test_a_run_bounded_by_steps_shows_its_steps_loss_validation_and_time_left_in_plain_lines(tmp_path, capsys):
    fit(tmp_path, [RunProgress(every=0)], max_steps=6, val_check_interval=3, limit_val_batches=2, enable_checkpointing=False)
    lines = capsys.readouterr().err.splitlines()
    progress = [line for line in lines if re.match(r"step \d/6 \(\d+%\)", line)]
    assert len(progress) == 6 and progress[-1].startswith("step 6/6 (100%)")
    assert re.search(r"tok/s  loss \d+\.\d{3}  val \d+\.\d{3}  0:\d\d elapsed, 0:\d\d left$", progress[-1])
    validations = [line for line in lines if "val_bpb" in line]
    assert [v.split()[1] for v in validations] == ["3/6", "6/6"] and all(re.search(r"val_bpb \d+\.\d{3}  loss", v) for v in validations)
    assert not any("Epoch" in line for line in lines)


def test_a_run_bounded_by_epochs_counts_its_steps(tmp_path, capsys):
    fit(tmp_path, [RunProgress(every=0)], max_epochs=2, limit_train_batches=3, limit_val_batches=0, enable_checkpointing=False)
    assert capsys.readouterr().err.splitlines()[-1].startswith("step 6/6 (100%)")


def test_the_summary_names_steps_validations_time_and_checkpoints(tmp_path, caplog):
    checkpoint = ModelCheckpoint(tmp_path / "checkpoints", monitor="val_bpb", save_last=True)
    with caplog.at_level(logging.INFO):
        fit(tmp_path, [RunSummary(model_line=False), checkpoint], max_steps=4, val_check_interval=2, limit_val_batches=1)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("done:")]
    assert re.fullmatch(
        rf"done: step 4/4 in 0:\d\d \([\d,]+ tok/s training\); val_bpb -?\d+\.\d{{3}}, best -?\d+\.\d{{3}}; "
        rf"checkpoints in {re.escape(str(tmp_path / 'checkpoints'))}: .*last\.ckpt.*",
        line,
    ), line


def test_the_model_line_counts_flops_as_the_model_does():
    from sparse_transformer.model import ModelConfig, SparseTransformer
    from sparse_transformer.model.patterns import AttentionPattern

    model = SparseTransformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=64, pattern=AttentionPattern("strided", 8, 16)))
    line = describe(model)
    assert line.startswith("model: 43.") and "2 layers" in line and "context 64" in line
    flops = float(re.search(r"([\d.]+) kFLOP/token forward", line).group(1)) * 1e3
    assert flops == pytest.approx(model.flops_per_token(), rel=1e-2) and flops > 0


def test_third_party_noise_is_silenced_by_message_only(caplog):
    quiet_third_party()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        quiet_third_party()  # after simplefilter, as a run's own filters come after Python's defaults
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("Checkpoint directory runs/x/checkpoints exists and is not empty.", UserWarning, stacklevel=1)
        warnings.warn("another deprecation", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["another deprecation"]
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=logger.name):
        logger.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_the_progress_line_reports_nothing_on_other_ranks(tmp_path, capsys):
    bar = RunProgress(every=0)
    bar.disable()
    fit(tmp_path, [bar], max_steps=2, limit_val_batches=0, enable_checkpointing=False)
    assert "step" not in capsys.readouterr().err


@pytest.mark.parametrize("width", [80, 60])
def test_the_whole_run_on_a_terminal_fits_it(tmp_path, monkeypatch, width):
    monkeypatch.setattr(terminal.shutil, "get_terminal_size", lambda fallback: os.terminal_size((width, 24)))
    stream = Terminal()
    monkeypatch.setattr(terminal.sys, "stderr", stream)
    fit(tmp_path, [RunProgress()], max_steps=6, val_check_interval=3, limit_val_batches=2, enable_checkpointing=False)
    lines = screen_lines(stream.getvalue())
    assert any(line.startswith("step 6/6") for line in lines) and all(len(line) < width for line in lines)


class TwoBlocks(BoringModel):
    """BoringModel whose ``model`` has blocks, as SparseTransformer's (``all_blocks``)."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.blocks = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(2))
        self.model.all_blocks = lambda: iter(self.model.blocks)

    def forward(self, x):
        for block in self.model.blocks:
            x = block(x)
        return self.layer(x)


def test_a_long_step_says_within_it_what_it_is_doing(tmp_path, capsys, monkeypatch):
    """A step of minutes (N = 2^20) shows its phase and block while it runs; here every step counts as long."""
    monkeypatch.setattr(RunProgress, "LONG_STEP", 0.0)
    trainer = L.Trainer(callbacks=[RunProgress(every=0)], logger=False, default_root_dir=tmp_path, enable_model_summary=False,
                        max_steps=2, limit_val_batches=0, enable_checkpointing=False)  # fmt: skip
    trainer.fit(TwoBlocks())
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step 2/2:")]
    said = [re.sub(r"  \d+:\d\d into the step$", "", line) for line in lines]
    assert said == [
        "step 2/2: forward, block 1 of 2",
        "step 2/2: forward, block 2 of 2",
        "step 2/2: backward, block 2 of 2 done",  # block 1's input is the batch: no gradient to wait for
        "step 2/2: optimizer step",
    ], lines


def test_a_short_step_shows_only_the_steps(tmp_path, capsys):
    trainer = L.Trainer(callbacks=[RunProgress(every=0)], logger=False, default_root_dir=tmp_path, enable_model_summary=False,
                        max_steps=2, limit_val_batches=0, enable_checkpointing=False)  # fmt: skip
    trainer.fit(TwoBlocks())
    assert not any(":" in line.split("  ")[0] for line in capsys.readouterr().err.splitlines() if line.startswith("step"))
