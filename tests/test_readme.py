"""Every command in the README works as written, in order, in a fresh clone.

The commands are read from the README's ``bash`` blocks. Each kind is checked as far as it goes in seconds:
``train.py`` commands are parsed with ``--print_config`` (every config file, key and value, as written),
``sample.py`` commands by its parser, ``--help`` runs, the tiny data commands write their files (into a temporary
folder), and the quickstart's sampling line runs for real on a tiny checkpoint. A command of a kind this file
does not know fails the test, so a new README command gets a check here.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import sys
import tomllib
from pathlib import Path

import pytest

import sample
import train
from commands import ROOT, run
from sparse_transformer.data.audio import main as audio_data
from sparse_transformer.data.images import main as image_data
from sparse_transformer.errors import run_cli

README = (ROOT / "README.md").read_text()
ACTIVATE = "source .venv/bin/activate"
VENV = ".venv/bin/"


def readme_commands() -> list[str]:
    """The README's shell commands in order: each ``bash`` block's lines (comments and SBATCH lines left out),
    continuation lines joined, ``a && b`` as two commands."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                commands += [part.strip() for part in line.split(" && ")]
    return commands


COMMANDS = readme_commands()


def words(command: str) -> list[str]:
    """The command's words with the environment's path and launchers taken off: ``python train.py ...``."""
    args = shlex.split(command.replace(VENV, ""))
    if args[0] == "srun":
        args = args[1:]
    if args[0] == "torchrun":  # its own options, then the script
        args = ["python", *args[next(i for i, a in enumerate(args) if a.endswith(".py")) :]]
    return args


def kind(command: str) -> str:
    args = words(command)
    if args[:3] == ["python3", "-m", "venv"] or args[:2] == ["pip", "install"] or command == ACTIVATE:
        return "setup"
    if args[0] == "tensorboard":
        return "tensorboard"
    if args[:2] in (["python", "train.py"], ["python", "sample.py"]):
        return "--help" if args[2:] == ["--help"] else args[1]
    if args[:3] == ["python", "-m", "pytest"]:
        return "pytest"
    if args[:2] == ["python", "-m"] and args[2].startswith("sparse_transformer.data."):
        return "data"
    if args[:2] == ["python", "-c"]:
        return "python -c"
    if args[:2] == ["python", "bench/compare.py"]:
        return "compare"
    return "unknown"


def test_every_command_is_one_this_file_checks():
    assert len(COMMANDS) > 20
    assert [c for c in COMMANDS if kind(c) == "unknown"] == []


def test_the_environment_is_set_up_before_any_bare_command():
    """In a fresh shell: the install and the first run use .venv/bin/, and the README activates the
    environment once before the first command that relies on it."""
    first_bare = next(i for i, c in enumerate(COMMANDS) if kind(c) != "setup" and not c.startswith(VENV))
    assert COMMANDS.index(ACTIVATE) < first_bare
    assert all(c.startswith((VENV, "python3 -m venv")) for c in COMMANDS[: COMMANDS.index(ACTIVATE)])


def test_the_install_commands_name_extras_the_project_has():
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for command in COMMANDS:
        for spec in re.findall(r"-e '?\.(?:\[(\w+)\])?'?", command):
            assert not spec or spec in extras, command


@pytest.mark.parametrize("command", [c for c in COMMANDS if kind(c) == "train.py"])
def test_train_commands_parse_as_written(command, capsys):
    args = words(command)[2:]
    with pytest.raises(SystemExit) as exit:
        run_cli(lambda: train.main([*args, "--print_config"]))
    out, err = capsys.readouterr()
    assert exit.value.code == 0, err
    assert "model:" in out and "trainer:" in out
    if "--print_config" in args:  # what the README says it shows of the shared setup
        assert "  logger: true\n" in out and "  callbacks: null\n" in out


@pytest.mark.parametrize("command", [c for c in COMMANDS if kind(c) == "sample.py"])
def test_sample_commands_parse_as_written(command):
    args = sample.parser().parse_args(words(command)[2:])
    assert args.ckpt.endswith(".ckpt")


@pytest.mark.parametrize("command", [c for c in COMMANDS if kind(c) == "--help"])
def test_help_commands(command, capsys):
    main = train.main if "train.py" in command else sample.main
    with pytest.raises(SystemExit) as exit:
        main(["--help"])
    assert exit.value.code == 0
    help = capsys.readouterr().out
    if main is train.main:
        assert "Train a Sparse Transformer" in help and "Lightning Trainer command line tool" not in help
    else:
        assert "--ckpt" in help and "(default: 1.0)" in help


def test_data_commands_write_their_files(tmp_path, capsys):
    commands = [c for c in COMMANDS if kind(c) == "data"]
    for command in commands:
        module, *args = words(command)[2:]
        if module == "sparse_transformer.data.text":  # downloads enwik8: the config's error names it instead
            assert "python -m sparse_transformer.data.text data/enwik8" in (ROOT / "configs" / "enwik8.yaml").read_text()
            continue
        main = {"sparse_transformer.data.images": image_data, "sparse_transformer.data.audio": audio_data}[module]
        target = tmp_path / Path(args[-1]).name
        main([*args[:-1], str(target)])
        assert any(target.iterdir()) and str(target) in capsys.readouterr().out
    assert {words(c)[2] for c in commands} >= {"sparse_transformer.data.images", "sparse_transformer.data.audio"}


def test_the_venv_has_the_programs_the_readme_calls():
    bin_dir = Path(sys.executable).parent
    for program in {words(c)[0] for c in COMMANDS if kind(c) == "tensorboard"} | {"torchrun"}:
        assert (bin_dir / program).exists() or shutil.which(program), program


def test_python_c_commands_run():
    for command in (c for c in COMMANDS if kind(c) == "python -c"):
        with contextlib.redirect_stdout(io.StringIO()):
            exec(words(command)[2], {})


def test_compare_commands_name_configs_that_load():
    from bench import compare

    for command in (c for c in COMMANDS if kind(c) == "compare"):
        args = words(command)[2:]
        compare.load_config(Path(args[args.index("--config") + 1]))


@pytest.mark.slow
def test_the_quickstart_sampling_line_runs_on_a_tiny_checkpoint(tmp_path):
    """The two commands' sampling line, as written, with the quickstart's checkpoint swapped for a tiny one."""
    trained = run("train.py", "fit", "--config", "configs/tiny.yaml", "--trainer.default_root_dir", str(tmp_path))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert any(line.startswith("done: step 6/6") for line in trained.stderr.splitlines())  # the summary line
    line = next(c for c in COMMANDS if kind(c) == "sample.py")
    args = words(line)[2:]
    args[args.index("--ckpt") + 1] = str(tmp_path / "checkpoints" / "last.ckpt")
    assert {"--temperature", "0.8", "--seed", "0"} <= set(args)  # the options the README's sample text names
    result = run("sample.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("--- sample 0 ---\nThe ") and len(result.stdout) > 250
