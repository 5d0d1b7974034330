"""The command line as a user meets it: help on every option, ``--version``, ``python -m``,
help without torch, one vocabulary (renamed options keep working, hidden), ``--config``,
``-v``/``-q``, a broken pipe, readable summaries."""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
from contextlib import redirect_stdout
from importlib.metadata import version
from pathlib import Path

import pytest

from qfv_brevitas.cli import common
from qfv_brevitas.cli.app import build_parser, main, parse
from qfv_brevitas.cli.helpspec import HELP_FILE, describe, help_parser, load_description

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import cli_help  # noqa: E402


def _leaves(parser, path=()):
    """``(path, parser)`` of every command that runs."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield path, parser
        return
    for name, sub in subs[0].choices.items():
        yield from _leaves(sub, path + (name,))


LEAVES = list(_leaves(build_parser()))


def _env():
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="100")
    env.pop("QFV_DEBUG", None)
    return env


def test_every_option_of_every_command_has_help():
    assert len(LEAVES) >= 20
    missing, hidden = [], []
    for path, p in LEAVES:
        for a in p._actions:
            if a.help == argparse.SUPPRESS:
                hidden.append((path, a.option_strings[0]))
            elif not (a.help or "").strip():
                missing.append(f"qfv {' '.join(path)} {'/'.join(a.option_strings) or a.dest}")
    assert not missing, "options without help:\n  " + "\n  ".join(missing)
    # the only hidden options are the old spellings of renamed ones
    assert hidden and all(opt in common.RENAMED for _, opt in hidden), hidden


def test_help_shows_each_default():
    text = _help(["faults", "eval", "--help"])
    assert re.search(r"--trials TRIALS\s+random maps \(chips\) per level \(default: 10\)", text)
    assert "(default: 0 0.05 0.1 0.2 0.3)" in " ".join(text.split())  # a list as typed
    assert "(default: None)" not in text and "(default: False)" not in text


def _help(argv):
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    return out.getvalue()


def test_version_and_python_m():
    want = (f"qfv-brevitas {__import__('qfv_brevitas').__version__} (torch {version('torch')}, "
            f"brevitas {version('brevitas')}, python ")
    for cmd in ([sys.executable, "-m", "qfv_brevitas", "--version"],
                [sys.executable, "-c", "import sys; from qfv_brevitas.cli import main; "
                 "sys.exit(main(['--version']))"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(want), r.stdout
    r = subprocess.run([sys.executable, "-m", "qfv_brevitas", "report", "--help"],
                       capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("usage: qfv report"), r.stderr


def test_help_of_every_command_imports_no_torch():
    """In one fresh interpreter: the help of every command, then torch is still not loaded
    (nor Brevitas, numpy or matplotlib)."""
    paths = [list(p) for p, _ in LEAVES] + [[]]
    code = ("import sys, io, contextlib\nfrom qfv_brevitas.cli.app import main\n"
            f"for path in {paths!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()):\n"
            "        try:\n            main(path + ['--help'])\n"
            "        except SystemExit as e:\n            assert e.code == 0, (path, e.code)\n"
            "print(sorted(m for m in ('torch', 'brevitas', 'numpy', 'matplotlib', 'onnx') "
            "if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_stored_help_description_is_current():
    """``help.json`` is what ``tools/cli_help.py`` writes from the real parser today (rerun it
    after changing an option)."""
    assert HELP_FILE.read_text(encoding="utf-8") == cli_help.render()


@pytest.mark.parametrize("columns", ["60", "100"])
def test_help_from_the_description_equals_the_real_parsers(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", columns)
    real = build_parser()
    fast = help_parser(describe(real), common.OneLineParser, common.HelpFormatter)
    assert fast.format_help() == real.format_help()
    fast_leaves = dict(_leaves(fast))
    for path, p in _leaves(real):
        assert fast_leaves[path].format_help() == p.format_help(), path
        assert fast_leaves[path].format_usage() == p.format_usage(), path


def test_help_falls_back_to_the_real_parser_without_the_description():
    """A fresh process whose stored description is missing builds the real parser (and so
    imports torch) and prints the same help."""
    code = ("import io, sys, contextlib\nfrom qfv_brevitas.cli import app\n"
            "app.load_description = lambda: None\nout = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n        app.main(['train', '--help'])\n"
            "    except SystemExit as e:\n        assert e.code == 0\n"
            "print('torch' in sys.modules, out.getvalue().splitlines()[0])")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True,
                       text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith("True usage: qfv train")


def test_usage_errors_are_the_same_from_the_description(capsys):
    for argv in (["bogus"], []):
        with pytest.raises(SystemExit) as e:
            parse(argv)
        assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and "the following arguments are required" in err


# -- one vocabulary -----------------------------------------------------------------------------

@pytest.mark.parametrize("command, old, new, value", [
    (["train"], "--fp-epochs", "float_epochs", "3"),
    (["train"], "--q-epochs", "qat_epochs", "2"),
    (["train"], "--q-lr", "qat_lr", "0.02"),
    (["train"], "--lr", "float_lr", "0.2"),
    (["demo"], "--mode", "forward_mode", "ste"),
    (["selftune", "q.pt"], "--mode", "correction", "shift"),
    (["faults", "finetune", "q.pt"], "--map", "fault_map", "chip.pt"),
    (["variability", "finetune", "q.pt"], "--map", "variability_map", "var.pt"),
    (["selftune", "q.pt"], "--var-map", "variability_map", "var.pt"),
    (["export", "q.pt", "--out", "m.onnx"], "--batch", "batch_size", "4"),
    (["snn", "train"], "--variant", "variants", "step"),
    (["variability", "eval", "q.pt"], "--devices-per-chip", "maps_per_chip", "2"),
])
def test_old_option_names_still_work_with_a_warning(command, old, new, value, capsys):
    args = parse(command + [old, value])
    got = getattr(args, new)
    assert str(got[0] if isinstance(got, list) else got) == value
    assert f"warning: {old} is renamed" in capsys.readouterr().err
    # and the new name means the same, silently
    new_option = "--" + new.replace("_", "-")
    assert getattr(parse(command + [new_option, value]), new) == got
    assert capsys.readouterr().err == ""


def test_old_names_are_hidden_and_the_readme_table_is_the_rename_table():
    text = _help(["train", "--help"])
    assert "--float-epochs" in text and "--fp-epochs" not in text
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Renamed options", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `(--[a-z-]+)` \| ([^|]+) \|", section, re.M)
    table = {old: tuple(re.findall(r"`(--[a-z-]+)`", news)) for old, news in rows}
    assert table == common.RENAMED


def test_every_renamed_option_is_used_by_some_command():
    """Each old spelling reaches a command (no dead entries), and no command offers an old
    name as its own option."""
    used = set()
    for path, p in LEAVES:
        for a in p._actions:
            if a.help == argparse.SUPPRESS:
                used.add(a.option_strings[0])
            else:
                assert not set(a.option_strings) & set(common.RENAMED) - {"--lr"}, (path, a)
    assert used == set(common.RENAMED)


# -- --config -----------------------------------------------------------------------------------

def test_config_yaml_and_json_give_the_options_and_the_command_line_wins(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("bits: [4]\nvariants: [nmult, step]\nfloat_epochs: 1\nqat-epochs: 3\n"
                 "per-channel: true\nno_progress: false\nmodel: mlp\nseed: 7\n")
    args = parse(["train", "--config", str(y), "--qat-epochs", "2", "--out", "o"])
    assert (args.bits, args.variants, args.float_epochs, args.qat_epochs, args.per_channel,
            args.no_progress, args.arch, args.seed) == ([4], ["nmult", "step"], 1, 2, True,
                                                        False, "mlp", 7)
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"rates": [0, 0.5], "trials": 3, "mapping": "aware"}))
    args = parse(["faults", "eval", "q.pt", f"--config={j}", "--trials", "5"])
    assert (args.rates, args.trials, args.mapping, args.checkpoint) == ([0, 0.5], 5, "aware",
                                                                         "q.pt")


@pytest.mark.parametrize("text, message", [
    ("bogus: 1\n", "'bogus' is not an option of qfv train"),
    ("per-channel: 1\n", "per-channel is a flag: true or false"),
    ("bits: {a: 1}\n", "bits: expected a number or a string"),
    ("float_epochs: 1\nfloat-epochs: 2\n", "are the same option"),
    ("seed: [1, 2]\n", "seed takes one value, got a list"),
    ("- 1\n- 2\n", "expected a mapping of options"),
    ("bits: [4\n", "not valid YAML"),
    ("config: other.yaml\n", "'config' is not an option"),
])
def test_config_errors_name_the_key_and_the_file(tmp_path, capsys, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    assert main(["train", "--config", str(f), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(f) in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_config_file_must_exist_and_be_a_regular_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "none.yaml")]) == 2
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert main(["train", "--config"]) == 2
    assert main(["train", "--config", "a.yaml", "--config", "b.yaml"]) == 2
    err = capsys.readouterr().err
    assert "none.yaml" in err and "more than once" in err


def test_a_config_bad_value_is_the_option_error(tmp_path, capsys):
    f = tmp_path / "c.json"
    f.write_text('{"trials": "many"}')
    with pytest.raises(SystemExit) as e:
        parse(["faults", "eval", "q.pt", "--config", str(f)])
    assert e.value.code == 2
    assert "argument --trials: expected an integer, got 'many'" in capsys.readouterr().err


# -- verbosity, pipes, summaries ---------------------------------------------------------------

@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """A 4-bit MLP checkpoint on digits' shapes (untrained: these tests read its maps)."""
    import torch

    from qfv_brevitas import NMultConfig, quantize_model, save_checkpoint
    from qfv_brevitas.zoo.models import build_model

    torch.manual_seed(0)
    cfg = NMultConfig(weight_bits=4, act_bits=None)
    model = quantize_model(build_model("mlp", (1, 8, 8), 10), cfg)
    path = tmp_path_factory.mktemp("ckpt") / "q.pt"
    save_checkpoint(path, model, "mlp", (1, 8, 8), 10, cfg, dataset="digits")
    return path


def test_faults_sample_prints_a_table_not_reprs(small_ckpt, tmp_path, capsys):
    from qfv_brevitas.chip.faults import FaultMap

    out = tmp_path / "chip.pt"
    assert main(["faults", "sample", str(small_ckpt), "--rate", "0.1", "--seed", "3",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "{" not in text and "'" not in text
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "shape", "bits", "cells", "stuck", "sa0", "sa1",
                                "fraction"]
    summary = FaultMap.load(out).summary()
    for name, row in summary.items():
        cells = next(line.split() for line in lines if line.split()[0] == name)
        assert cells[1] == "x".join(map(str, row["shape"]))
        assert [int(c) for c in cells[2:7]] == [row[k] for k in ("bits", "cells", "stuck",
                                                                 "sa0", "sa1")]
    assert lines[-1] == f"wrote {out}"


def test_quiet_hides_status_lines_and_verbose_shows_the_settings(small_ckpt, tmp_path, capsys):
    out = tmp_path / "a.pt"
    assert main(["faults", "sample", str(small_ckpt), "--rate", "0.1", "--out", str(out),
                 "-q"]) == 0
    quiet = capsys.readouterr()
    assert "wrote" not in quiet.out and "layer" in quiet.out and quiet.err == ""
    assert main(["-v", "faults", "sample", str(small_ckpt), "--rate", "0.1",
                 "--out", str(tmp_path / "b.pt")]) == 0
    loud = capsys.readouterr()
    assert "wrote" in loud.out
    assert re.search(r"qfv: DEBUG: device: cpu; intra-op threads:", loud.err)
    assert "rate=0.1" in loud.err
    assert main(["faults", "sample", str(small_ckpt), "--rate", "0.1",
                 "--out", str(tmp_path / "c.pt")]) == 0
    assert "DEBUG" not in capsys.readouterr().err


def test_quiet_turns_progress_off():
    args = parse(["faults", "eval", "q.pt", "-q"])
    common.configure_logging(args)
    assert args.no_progress is True
    args = parse(["faults", "eval", "q.pt"])
    common.configure_logging(args)
    assert args.no_progress is False


@pytest.mark.parametrize("argv", [["train", "--help"], ["report", "{ckpt}"]])
def test_a_reader_that_goes_away_is_a_quiet_exit(small_ckpt, argv):
    """``qfv ... | head`` where head has exited: no error text, exit 141 (128 + SIGPIPE)."""
    argv = [a.format(ckpt=small_ckpt) for a in argv]
    r_fd, w_fd = os.pipe()
    os.close(r_fd)  # nobody will read
    p = subprocess.run([sys.executable, "-m", "qfv_brevitas", *argv], stdout=w_fd,
                       stderr=subprocess.PIPE, text=True, env=_env(), timeout=300)
    os.close(w_fd)
    # argparse swallows its own write errors, so the help may also end with 0
    assert p.returncode == 141 or argv[-1] == "--help" and p.returncode == 0, p.stderr
    assert p.stderr.strip() == ""


def test_readme_forms_run(tmp_path, capsys):
    """What README shows: ``qfv --version``, ``qfv --help`` and a run configured by a file
    (its settings reach the run: one variant, one width, the file's epochs)."""
    assert main(["--version"]) == 0
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "commands (qfv COMMAND --help for each)" in capsys.readouterr().out
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: mlp\nbits: [3]\nvariants: [nmult]\nfloat-epochs: 1\nqat_epochs: 2\n"
                   "lambda-rise-epochs: 1\nno-progress: true\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["weight_bits"]) for r in results["runs"]] == [("nmult", 3)]
    assert results["q_train"]["epochs"] == 2 and results["fp_train"]["epochs"] == 1
