"""What every ``qfv`` command module shares: the command registry, the argument groups (built
from the configs' defaults), the input/output checks and loading a checkpoint with its data.

A command module declares each subcommand with :func:`command`; the decorated function adds
the subcommand's arguments to its parser and returns the function that runs it (a function of
the parsed arguments returning the exit status)::

    command_group("bitflips", help="transient bit flips: ...")

    @command("bitflips", "eval", help="accuracy under random bit flips")
    def bitflips_eval(p):
        add_checkpoint_args(p, out="qfv-bitflips", kind="results", names=...)
        p.add_argument("--rates", ...)
        return run_bitflips

:func:`qfv_brevitas.cli.app.build_parser` builds the parser from the registry, in the order
the commands were registered.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from qfv_brevitas.core.widths import MAX_FRAC_BITS
from qfv_brevitas.util.errors import QfvError

__all__ = ["OneLineParser", "HelpFormatter", "one_line", "command", "command_group",
           "add_commands", "command_path", "RENAMED", "add_renamed_options", "note",
           "add_verbosity_args", "configure_logging", "declare_io", "check_io", "add_dataset_args",
           "add_checkpoint_args", "add_reg_args", "add_lambda_args", "add_finetune_args",
           "finetune_config", "add_study_args", "study_config", "add_variability_args",
           "variability_settings", "add_run_args", "apply_run_args", "result_names",
           "require_quantized", "load_for_device", "meta_of", "is_output_rank", "NEEDS_QUANTIZED",
           "DATASETS", "integer", "seed", "check_device", "check_workers", "INT_LIMIT",
           "SEED_LIMIT", "show"]

#: The data sets of the image commands.
DATASETS = ("digits", "idx")


# -- the registry --------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose refusal is one line naming the argument, ``qfv <command>:
    error: argument --x: ...``, exit 2 (argparse's own prints the whole usage first); its
    subcommands' parsers are of the same class."""

    def error(self, message: str):
        from qfv_brevitas.util.text import printable

        self.exit(2, printable(f"{self.prog}: error: {one_line(message)} (see {self.prog} "
                               "--help)") + "\n")


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, ``(default: X)``, unless the help already
    says it or there is none to say (``None``, a flag's ``False``); a list default is written
    as it is typed (``fixed step nmult``)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings and action.nargs not in ("?", "*")) \
                or default in (None, False, argparse.SUPPRESS) or action.nargs == 0 \
                or "default" in text.lower():
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(str(v) for v in default)
        shown = str(default).replace("%", "%%")
        return f"{text} (default: {shown})" if text else f"default: {shown}"


def one_line(text: object) -> str:
    """The lines of a message joined by "; ". Only a newline ends a line: a name holding
    another line break (``\\x85``, ``\\u2028``, a lone ``\\r``) is kept whole, to be
    escaped."""
    lines = (line.strip(" \t\r") for line in str(text).split("\n"))
    return "; ".join(line for line in lines if line)


@dataclass(frozen=True)
class _Command:
    path: Tuple[str, ...]
    declare: Optional[Callable[[argparse.ArgumentParser], Callable]]
    kwargs: dict


_COMMANDS: List[_Command] = []


def _register(path: Tuple[str, ...], declare, kwargs: dict) -> None:
    if not path or not all(isinstance(p, str) and p for p in path):
        raise QfvError(f"a command path is one or more names, got {path!r}")
    known = {c.path: c for c in _COMMANDS}
    if path in known:
        raise QfvError(f"qfv {' '.join(path)} is registered already")
    parent = path[:-1]
    if parent and (parent not in known or known[parent].declare is not None):
        raise QfvError(f"qfv {' '.join(path)}: register the group qfv {' '.join(parent)} "
                       "first (command_group)")
    _COMMANDS.append(_Command(path, declare, dict(kwargs)))


def command(*path: str, **parser_kwargs) -> Callable:
    """Decorator: register ``qfv <path>``; ``parser_kwargs`` go to ``add_parser`` (``help``,
    ``description``). The decorated ``declare(p)`` adds the arguments to the parser ``p``
    and returns the run function ``run(args) -> exit status``."""
    def decorate(declare: Callable[[argparse.ArgumentParser], Callable]) -> Callable:
        _register(tuple(path), declare, parser_kwargs)
        return declare
    return decorate


def command_group(*path: str, **parser_kwargs) -> None:
    """Register ``qfv <path>`` as a group of subcommands (``qfv faults sample|eval|...``)."""
    _register(tuple(path), None, parser_kwargs)


def command_path(argv: Sequence[str]) -> Optional[Tuple[str, ...]]:
    """The registered command that ``argv`` runs (``("faults", "eval")``): its first words
    that are not options, if they name a command; else None."""
    words = []
    for token in argv:
        if token == "--":
            break
        if not token.startswith("-"):
            words.append(token)
        elif words:
            break
    known = {c.path: c for c in _COMMANDS}
    for n in range(len(words), 0, -1):
        c = known.get(tuple(words[:n]))
        if c is not None and c.declare is not None:
            return c.path
    return None


#: Options renamed so that one name means one thing across the commands: the old spelling ->
#: the new ones it may stand for (the first the command has). The old spellings still work for
#: one release, hidden from ``--help``, with a deprecation warning naming the new one;
#: README's table "Renamed options" is this one (a test compares them).
RENAMED: Dict[str, Tuple[str, ...]] = {
    "--fp-epochs": ("--float-epochs",),
    "--q-epochs": ("--qat-epochs",),
    "--q-lr": ("--qat-lr",),
    "--lr": ("--float-lr",),
    "--mode": ("--forward-mode", "--correction"),
    "--map": ("--fault-map", "--variability-map"),
    "--var-map": ("--variability-map",),
    "--batch": ("--batch-size",),
    "--variant": ("--variants",),
    "--devices-per-chip": ("--maps-per-chip",),
    "--arch": ("--model",),
}


class _RenamedOption(argparse.Action):
    """The old spelling of a renamed option: warns, then does what the new one does."""

    def __init__(self, option_strings, dest, new: argparse.Action = None, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, nargs=new.nargs, default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS, metavar=new.metavar, choices=new.choices,
                         type=new.type)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is renamed "
              f"{self.new.option_strings[-1]}; the old name goes in the next release",
              file=sys.stderr)
        self.new(parser, namespace, values, option_string)


def add_renamed_options(p: argparse.ArgumentParser) -> None:
    """The hidden old spellings (:data:`RENAMED`) of the options ``p`` has."""
    known = p._option_string_actions
    for old, news in RENAMED.items():
        if old in known:
            continue
        for new in news:
            if new in known:
                action = known[new]
                # in the new option's either-or group, so that the old name counts there
                group = next((g for g in p._mutually_exclusive_groups
                              if action in g._group_actions), p)
                group.add_argument(old, action=_RenamedOption, new=action, dest=action.dest)
                break


def add_commands(sub, only: Optional[Tuple[str, ...]] = None) -> None:
    """Add every registered command to ``sub`` (the top-level subparsers): groups get their
    own subparsers (``dest="action"``), leaves their arguments, ``--threads``/``--device``
    (:func:`add_run_args`) and their run function (``args._run``). With ``only`` (a command's
    path), just that command and its groups: the others' options are never declared (their
    declarations may import the studies)."""
    subs: Dict[Tuple[str, ...], object] = {(): sub}
    for c in _COMMANDS:
        if only is not None and c.path != only[:len(c.path)]:
            continue
        p = subs[c.path[:-1]].add_parser(c.path[-1], formatter_class=HelpFormatter,
                                         **c.kwargs)
        if c.declare is None:
            subs[c.path] = p.add_subparsers(dest="action", required=True)
            continue
        run = c.declare(p)
        add_run_args(p)
        add_renamed_options(p)
        p.set_defaults(_run=run)


# -- inputs and outputs ----------------------------------------------------------------------------

def declare_io(p: argparse.ArgumentParser, out: Optional[str],
               names: Sequence[str] = (), inputs: Sequence[str] = ("checkpoint",)) -> None:
    """Declare what a subcommand reads and writes, for the checks :func:`check_io` runs before
    any work (a command module calls this beside its own ``add_argument`` calls).

    ``inputs``: argument names (dests) holding input paths. ``out``: what ``--out`` is:
    ``"file"`` (one file), ``"run"`` (a run folder replaced whole), ``"crossbar"`` (a crossbar
    folder replaced whole), ``"results"`` (a folder receiving the files ``names``), or None
    (the command writes nothing). With an output, ``--force`` is added: an existing output is
    replaced only with it; an output that is one of the inputs is always refused. A command
    whose ``--out`` is optional names its default with ``set_defaults(_io_default_out=f)``,
    ``f(args) -> path``, so that the default is checked the same way.
    """
    if out is not None:
        p.add_argument("--force", action="store_true",
                       help="replace an existing output (it is never one of the inputs)")
    p.set_defaults(_io_out=out, _io_names=tuple(names), _io_inputs=tuple(inputs))


def _option(dest: str) -> str:
    """How the command line spells the argument stored as ``dest``."""
    return dest.upper() if dest in _POSITIONAL else "--" + dest.replace("_", "-")


#: the arguments that are given by position (``qfv report CHECKPOINT``, ``qfv inspect FILE``)
_POSITIONAL = ("checkpoint", "file")


def _check_paths(args) -> None:
    """Every declared input path and ``--out``: not an empty string (which would mean the
    current folder) and no NUL character (no system call takes one)."""
    for dest in (*getattr(args, "_io_inputs", ()), "out"):
        value = getattr(args, dest, None)
        if value is None:
            continue
        if str(value).strip() == "":
            raise QfvError(f"{_option(dest)}: the path is empty; give a file or folder name")
        if "\0" in str(value):
            raise QfvError(f"{_option(dest)}: the path {str(value)!r} holds a NUL character")


def check_io(args) -> None:
    """The declared inputs and output of ``args`` (see :func:`declare_io`): no path empty; the
    output may be written: not an input, not existing unless --force, a regular file (or a
    folder for a folder output), its folder writable. Raises OutputError naming it."""
    from qfv_brevitas.util.safeio import check_output

    _check_paths(args)
    kind = getattr(args, "_io_out", None)
    if kind is None:
        return
    if getattr(args, "out", None) is None and getattr(args, "_io_default_out", None):
        args.out = args._io_default_out(args)  # an output named after the input
    inputs = [getattr(args, d) for d in getattr(args, "_io_inputs", ())
              if getattr(args, d, None)]
    force = bool(getattr(args, "force", False))
    if kind == "file":
        check_output(args.out, overwrite=force, inputs=inputs)
    elif kind == "run":
        from qfv_brevitas.studies.experiment import not_a_run_folder

        check_output(args.out, overwrite=force, inputs=inputs, kind="dir",
                     replaceable=not_a_run_folder)
    elif kind == "crossbar":
        from qfv_brevitas.export.crossbar import not_a_crossbar_folder

        check_output(args.out, overwrite=force, inputs=inputs, kind="dir",
                     replaceable=not_a_crossbar_folder)
    elif kind == "results":
        from qfv_brevitas.util.errors import OutputError

        if os.path.lexists(args.out) and not Path(args.out).is_dir():
            raise OutputError(f"output folder {args.out} exists and is not a folder")
        for name in args._io_names:
            check_output(Path(args.out) / name, overwrite=force, inputs=inputs)


def result_names(name: str, kinds: Sequence[str] = ("csv", "json", "png")) -> List[str]:
    """The files a study command writes: ``name.csv``, ``name.json``, ``name.png``."""
    return [f"{name}.{k}" for k in kinds]


# -- what a command prints --------------------------------------------------------------------------

def show(text: object = "", file=None) -> None:
    """``print(text)`` with every line escaped (:func:`~qfv_brevitas.util.text.printable_lines`):
    a layer name, a metadata value or a file name written by someone else never reaches the
    terminal as an escape sequence, a C1 control or a bidi override. Every command prints
    through it."""
    from qfv_brevitas.util.text import printable_lines

    print(printable_lines(text), file=file)


def note(text: object) -> None:
    """A status line of a command (``wrote ...``, ``next: ...``): printed like :func:`show`
    but through the ``qfv_brevitas.cli`` logger, so ``-q`` hides it and the results stay."""
    from qfv_brevitas.util.text import printable_lines

    logging.getLogger("qfv_brevitas.cli").info(printable_lines(text))


# -- verbosity ---------------------------------------------------------------------------------------

class _StdoutHandler(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is when a record is written (a test's capture, a
    redirected stream)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.setStream(sys.stdout)
        super().emit(record)


def add_verbosity_args(p: argparse.ArgumentParser, leaf: bool = False) -> None:
    """``-v/--verbose`` and ``-q/--quiet``, before the command word or after it (``leaf``:
    no default of their own there, so that ``qfv -q train`` is not undone)."""
    extra = {"default": argparse.SUPPRESS} if leaf else {}
    p.add_argument("-v", "--verbose", action="count", help="more detail: the settings "
                   "used, the threads and device chosen (logging level DEBUG)",
                   **({"default": 0} if not leaf else extra))
    p.add_argument("-q", "--quiet", action="store_true",
                   help="only results, warnings and errors: no progress bars, no status "
                        "lines (logging level WARNING)", **extra)


def configure_logging(args) -> None:
    """The levels of ``-v``/``-q``: the ``qfv_brevitas`` loggers at DEBUG (``-v``), INFO (the
    default) or WARNING (``-q``, which also turns progress bars off). Status lines of the
    commands go to stdout, every other record to stderr, as ``qfv: LEVEL: message``."""
    quiet = bool(getattr(args, "quiet", False))
    level = logging.WARNING if quiet else \
        logging.DEBUG if getattr(args, "verbose", 0) else logging.INFO
    if quiet and hasattr(args, "no_progress"):
        args.no_progress = True
    root, cli = logging.getLogger("qfv_brevitas"), logging.getLogger("qfv_brevitas.cli")
    for logger in (root, cli):  # the handlers of an earlier main() in this process
        for h in [h for h in logger.handlers if getattr(h, "_qfv", False)]:
            logger.removeHandler(h)
    errors = logging.StreamHandler()  # sys.stderr when created
    errors.setFormatter(logging.Formatter("qfv: %(levelname)s: %(message)s"))
    errors.addFilter(lambda r: not r.name.startswith("qfv_brevitas.cli"))
    status = _StdoutHandler()
    status.setFormatter(logging.Formatter("%(message)s"))
    for h in (errors, status):
        h._qfv = True
    root.addHandler(errors)
    cli.addHandler(status)
    cli.propagate = False
    root.setLevel(level)
    cli.setLevel(level)


# -- values of options -----------------------------------------------------------------------------

#: the largest size of an integer option: what a C int holds, so that no count reaches torch,
#: numpy or the kernels as a number they overflow on (and no job of that size finishes)
INT_LIMIT = 2**31 - 1
#: the largest seed: what numpy, scikit-learn (a data split) and torch all take
SEED_LIMIT = 2**32 - 1


def integer(text: str) -> int:
    """The argparse type of an integer option: an integer of at most :data:`INT_LIMIT` in
    size (the configs check each option's own range)."""
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if abs(n) > INT_LIMIT:
        raise argparse.ArgumentTypeError(f"{text} is out of range: at most {INT_LIMIT} in size")
    return n


def seed(text: str) -> int:
    """The argparse type of ``--seed``: an integer in 0..:data:`SEED_LIMIT`."""
    try:
        n = int(text)
    except (TypeError, ValueError):
        n = -1
    if not 0 <= n <= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{SEED_LIMIT}, got {text!r}")
    return n


# -- argument groups -------------------------------------------------------------------------------

def frac_bits_arg(text: str):
    """``--frac-bits``: ``auto`` or an integer 0..20 (the integer view of the levels)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or an integer 0..20, got {text!r}") from None
    if not 0 <= value <= MAX_FRAC_BITS:
        raise argparse.ArgumentTypeError(f"expected auto or an integer 0..{MAX_FRAC_BITS}, "
                                         f"got {text!r}")
    return value


def add_dataset_args(p: argparse.ArgumentParser,
                     help: str = "digits: scikit-learn's bundled 8x8 digits; idx: "
                                 "MNIST-family IDX files") -> None:
    """``--dataset digits|idx|<plugin>``, ``--data module:function`` and ``--data-dir``
    (the name is checked when the command runs: the parser loads no plugin)."""
    from qfv_brevitas.cli.usercode import LateChoices, data_option, dataset_names

    p.add_argument("--dataset", action=LateChoices, names=dataset_names, specs=True,
                   default="digits", metavar="NAME",
                   help=f"{help}; or an installed plugin's data set")
    data_option(p)
    p.add_argument("--data-dir", help="folder with the IDX files (for --dataset idx; given "
                                      "to a plugin's or your own data function as data_dir)")


def add_checkpoint_args(p: argparse.ArgumentParser, out: Optional[str] = None,
                        kind: Optional[str] = None, names: Sequence[str] = (),
                        inputs: Sequence[str] = ("checkpoint", "data_dir")) -> None:
    """The arguments of a command that puts a checkpoint on a simulated chip: ``CHECKPOINT``,
    the data (``--dataset``, ``--data-dir``), ``--seed`` of the maps, ``--layers``, ``--out``
    (default ``out``; none if None), ``--no-progress``; what it reads and writes
    (:func:`declare_io`: ``kind``, ``names``, ``inputs``)."""
    from qfv_brevitas.cli.usercode import add_allow_import
    from qfv_brevitas.studies.engine import CompareConfig
    from qfv_brevitas.studies.scenario import LAYER_SETS

    declare_io(p, kind, names, inputs)
    p.add_argument("checkpoint", help="a model saved by qfv demo/train (or a fine-tune)")
    add_dataset_args(p, help="the data the checkpoint was trained on")
    p.add_argument("--seed", type=seed, default=CompareConfig.seed,
                   help="the run's seed: every map, flip stream and fine-tune of the command "
                        "is drawn from it (the data split is the checkpoint's own)")
    if out is not None:
        p.add_argument("--out", default=out, help="output " + (
            "folder" if kind == "results" else "file"))
    add_allow_import(p)
    p.add_argument("--layers", choices=LAYER_SETS, default=CompareConfig.layers,
                   help="inner: first and last (8-bit) layers stay ideal (paper setup); "
                        "all: every quantized layer is on the imperfect chip")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also -q)")


def add_reg_args(p: argparse.ArgumentParser, sam: bool = True) -> None:
    """``--reg-shape``, ``--reg-width`` and (``sam``) ``--sam-rho`` of a training
    (defaults: :class:`~qfv_brevitas.training.train.TrainConfig`)."""
    from qfv_brevitas.core.distance import SHAPES
    from qfv_brevitas.training.train import TrainConfig

    p.add_argument("--reg-shape", choices=SHAPES, default=TrainConfig.reg_shape,
                   help="regularizer shape: sq (paper), gauss (Gaussian well), sin (SinReQ)")
    p.add_argument("--reg-width", type=float, default=TrainConfig.reg_width,
                   help="gauss: sigma as a fraction of the local level spacing")
    if sam:
        p.add_argument("--sam-rho", type=float, default=TrainConfig.sam_rho,
                       help="SAM radius (FlatENN's sharpness-aware quantization); 0 = off")


def add_lambda_args(p: argparse.ArgumentParser, rise: int) -> None:
    """``--lambda-start``, ``--lambda-end`` (defaults: :class:`~qfv_brevitas.training.train.
    TrainConfig`) and ``--lambda-rise-epochs`` (default ``rise``) of a QAT."""
    from qfv_brevitas.training.train import TrainConfig

    p.add_argument("--lambda-start", type=float, default=TrainConfig.lambda_start,
                   help="the regularizer's lambda while it is held (paper: 100)")
    p.add_argument("--lambda-end", type=float, default=TrainConfig.lambda_end,
                   help="the regularizer's lambda at the end of the rise (paper: 2000)")
    p.add_argument("--lambda-rise-epochs", type=integer, default=rise,
                   help="lambda rises exponentially from --lambda-start to --lambda-end over "
                        "this many last epochs")


def add_finetune_args(p: argparse.ArgumentParser, sam: bool = True) -> None:
    """``--epochs``, ``--lr``, ``--lambda-rise-epochs`` of a fine-tune (defaults:
    :func:`~qfv_brevitas.studies.engine.default_finetune`) and the regularizer's arguments
    (:func:`add_reg_args`)."""
    from qfv_brevitas.studies.engine import default_finetune

    ft = default_finetune()
    p.add_argument("--epochs", type=integer, default=ft.epochs, help="epochs of every fine-tune")
    p.add_argument("--lr", type=float, default=ft.lr,
                   help="learning rate of the weights in every fine-tune")
    p.add_argument("--lambda-rise-epochs", type=integer, default=ft.lambda_rise_epochs,
                   help="the regularizer's lambda rises to its final value over this many "
                        "last epochs")
    add_reg_args(p, sam)


def finetune_config(args, sam: bool = True):
    """The :class:`~qfv_brevitas.training.train.TrainConfig` of :func:`add_finetune_args` (its
    ``--sam-rho`` with ``sam``)."""
    from dataclasses import replace

    from qfv_brevitas.studies.engine import default_finetune

    sam = {"sam_rho": args.sam_rho} if sam else {}
    return replace(default_finetune(), epochs=args.epochs, lr=args.lr,
                   lambda_rise_epochs=min(args.lambda_rise_epochs, args.epochs),
                   seed=args.seed, reg_shape=args.reg_shape, reg_width=args.reg_width, **sam)


def add_study_args(p: argparse.ArgumentParser, selftune: bool = False, remap: bool = True
                   ) -> None:
    """The knobs of a Monte Carlo study with fine-tunes (defaults:
    :class:`~qfv_brevitas.studies.engine.CompareConfig`): ``--trials``, (``remap``)
    ``--remap-every``, ``--sam-rho`` (of ``saq``/``saq_aware``), ``--rbe-rate``, the fine-tune
    (:func:`add_finetune_args`) and with ``selftune`` ``--no-selftune-on-top``,
    ``--calib-size``, ``--selftune-passes``."""
    from qfv_brevitas.studies.engine import CompareConfig as C

    p.add_argument("--trials", type=integer, default=C.trials,
                   help="random maps (chips) per level and method")
    if remap:
        p.add_argument("--remap-every", type=integer, default=C.remap_every,
                       help="epochs between the nearest-valid remaps of the fault-aware "
                            "fine-tunes")
    p.add_argument("--sam-rho", type=float, default=C.sam_rho,
                   help="SAM radius of saq, saq_aware")
    p.add_argument("--rbe-rate", type=float, default=C.rbe_rate,
                   help="bit-error rate of random-bit-error training")
    add_finetune_args(p, sam=False)
    if selftune:
        p.add_argument("--no-selftune-on-top", action="store_true",
                       help="do not report every method after self-tuning too")
        p.add_argument("--calib-size", type=integer, default=C.calib_size,
                       help="unlabeled training images that self-tuning calibrates on")
        p.add_argument("--selftune-passes", type=integer, default=C.selftune_passes,
                       help="bit-flip scenarios: calibration passes (flip draws) pooled")


def study_config(args, **changes):
    """The :class:`~qfv_brevitas.studies.engine.CompareConfig` of :func:`add_study_args`."""
    from qfv_brevitas.studies.engine import CompareConfig

    kw = dict(trials=args.trials, seed=args.seed, finetune=finetune_config(args, sam=False),
              rbe_rate=args.rbe_rate, sam_rho=args.sam_rho, remap_every=args.remap_every,
              layers=args.layers)
    if hasattr(args, "no_selftune_on_top"):
        kw.update(selftune_on_top=not args.no_selftune_on_top, calib_size=args.calib_size,
                  selftune_passes=args.selftune_passes)
    kw.update(changes)
    return CompareConfig(**kw)


def add_variability_args(p: argparse.ArgumentParser) -> None:
    """The variability settings of a :class:`~qfv_brevitas.studies.scenario.Scenario`
    (defaults from it): ``--hrs-on-off``, ``--distribution``, ``--chip-sigma``,
    ``--layer-shared-sigma``, ``--devices-per-chip``."""
    from qfv_brevitas.studies.scenario import Scenario as S

    p.add_argument("--hrs-on-off", type=float, default=S.hrs_on_off,
                   help="model HRS too: LRS/HRS on/off ratio")
    p.add_argument("--distribution", choices=("normal", "lognormal"), default=S.distribution,
                   help="distribution of the per-cell conductance factors")
    p.add_argument("--chip-sigma", type=float, default=S.chip_sigma,
                   help="between-chip component shared by every cell of a chip")
    p.add_argument("--layer-shared-sigma", type=float, default=S.layer_shared_sigma,
                   help="component shared by every cell of a layer")
    p.add_argument("--maps-per-chip", type=integer, default=S.devices_per_chip,
                   help="eval/compare: trials in groups of this many cell maps per chip (they "
                        "share the chip's --chip-sigma draw)")


def variability_settings(args) -> dict:
    """The keyword arguments of :func:`add_variability_args`."""
    return dict(hrs_on_off=args.hrs_on_off, distribution=args.distribution,
                chip_sigma=args.chip_sigma, layer_shared_sigma=args.layer_shared_sigma,
                devices_per_chip=args.maps_per_chip)


# -- run options -----------------------------------------------------------------------------------

def add_run_args(p: argparse.ArgumentParser) -> None:
    """``--threads``, ``--device`` (and ``--workers``/``--distributed`` on Monte Carlo
    commands, those with ``--trials``) of a leaf command."""
    add_verbosity_args(p, leaf=True)
    p.add_argument("--config", metavar="FILE",
                   help="read this command's options from a JSON or YAML file (keys: the long "
                        "options without dashes, e.g. float-epochs: 30); options typed on the "
                        "command line win")
    p.add_argument("--threads", default="auto",
                   help="intra-op threads: an integer, or auto (1 for small models such as the "
                        "digits ones, else one per core)")
    p.add_argument("--device", default=None,
                   help="torch device the model runs on: cpu (default), cuda[:N] or mps "
                        "(the simulated chip is --fault-map/--variability-map)")
    if p.get_default("trials") is not None:
        p.add_argument("--workers", type=integer, default=1,
                       help="processes on this machine that share the Monte Carlo maps "
                            "(same results as 1)")
        p.add_argument("--distributed", action="store_true",
                       help="share the maps over the ranks of torchrun (gloo on CPUs, nccl "
                            "on GPUs); rank 0 writes the outputs")


def check_device(text: Optional[str]) -> Optional[str]:
    """``--device`` checked: ``None`` (the default, the CPU), ``cpu``, ``cuda[:N]`` with CUDA
    there and ``N`` one of its devices, or ``mps`` where Apple's backend is; returns torch's
    spelling of it. Anything else (a typo, ``meta``, a second CPU) is an error naming it."""
    if text is None:
        return None
    import torch

    if not str(text).strip():
        raise QfvError("--device is empty; give cpu or cuda[:N]")
    try:
        dev = torch.device(str(text).strip())
    except (RuntimeError, ValueError, TypeError):
        raise QfvError(f"--device {text!r} is not a device; give cpu or cuda[:N]") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise QfvError(f"--device {text}: CUDA is not available here (no GPU, or a torch "
                           "built without CUDA); give --device cpu")
        n = torch.cuda.device_count()
        if dev.index is not None and not dev.index < n:
            raise QfvError(f"--device {text}: this machine has {n} CUDA device(s), "
                           f"cuda:0..cuda:{n - 1}")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise QfvError(f"--device {text}: Apple's MPS backend is not available here; give "
                           "--device cpu")
    elif dev.type != "cpu":
        raise QfvError(f"--device {text}: qfv runs on cpu, cuda[:N] or mps, not {dev.type}")
    if dev.type in ("cpu", "mps"):
        if dev.index not in (None, 0):
            raise QfvError(f"--device {text}: there is one {dev.type} device; give {dev.type}")
        return dev.type
    return str(dev)


def check_workers(value) -> Optional[int]:
    """``--workers`` checked: 1 up to :func:`~qfv_brevitas.util.threads.max_threads` (4
    processes per core at most: more only wait for each other, and each holds a model)."""
    if value is None:
        return None
    from qfv_brevitas.util.threads import max_threads

    top = max_threads()
    if not 1 <= value <= top:
        raise QfvError(f"--workers must be 1..{top} (processes on this machine, at most 4 per "
                       f"core), got {value}")
    return value


def apply_run_args(args) -> None:
    """Check ``--device`` and ``--workers``, set the thread count and join the
    ``torch.distributed`` group the arguments ask for; refuse an unknown ``QFV_KERNELS``."""
    from qfv_brevitas.core.kernels import setting_error
    from qfv_brevitas.util.threads import parse_threads

    if setting_error() is not None:
        raise QfvError(setting_error())
    args.device = check_device(getattr(args, "device", None))
    check_workers(getattr(args, "workers", None))
    n = parse_threads(getattr(args, "threads", "auto"))
    if n is not None:
        import torch

        torch.set_num_threads(n)
        args.threads = n
    if getattr(args, "distributed", False):
        from qfv_brevitas.util.parallel import init_distributed

        init_distributed()
    log = logging.getLogger("qfv_brevitas.run")
    log.debug("device: %s; intra-op threads: %s", args.device or "cpu",
              n if n is not None else "auto (set per model once it is loaded)")
    if log.isEnabledFor(logging.DEBUG):
        options = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        log.debug("options: %s", ", ".join(f"{k}={v}" for k, v in sorted(options.items())))


def is_output_rank(args) -> bool:
    """Whether this process writes the outputs (rank 0 under ``--distributed``)."""
    from qfv_brevitas.studies.engine import is_main_rank

    return is_main_rank(bool(getattr(args, "distributed", False)))


# -- checkpoints and their data --------------------------------------------------------------------

#: what each command does with a checkpoint, for the error on a float (unquantized) one
NEEDS_QUANTIZED = {
    "export": "qfv export writes N-multiplier layers to QONNX",
    "verify": "qfv verify checks an export of N-multiplier layers",
    "crossbar": "qfv crossbar maps N-multiplier layers onto crossbars",
    "compare": "the methods compared act on N-multiplier layers",
    "bitflips": "bit flips act on the bit cells of N-multiplier layers",
    "selftune": "self-tuning corrects a chip of N-multiplier layers",
}


def require_quantized(args, info) -> None:
    """A clear error if the checkpoint ``info`` holds a float model."""
    if info["config"] is None:
        what = NEEDS_QUANTIZED.get(args.command, "faults and variability apply to "
                                                 "N-multiplier layers")
        raise QfvError(f"{args.checkpoint} is a float model ({info['arch']}, no quantized "
                       f"layers): {what}; give a quantized checkpoint such as "
                       "nmult_w4a4.pt from qfv train/demo")


def load_for_device(args):
    """``(model, info, train, test)``: the quantized checkpoint ``args.checkpoint`` on
    ``args.device`` and the train/test split it was made with (checked against its
    fingerprint)."""
    from qfv_brevitas.cli.usercode import import_permission
    from qfv_brevitas.zoo.checkpoint import load_checkpoint
    from qfv_brevitas.zoo.data import fingerprint, load_dataset

    if args.dataset == "idx" and not args.data_dir:
        raise QfvError("--dataset idx needs --data-dir DIR (a folder with the IDX files)")
    model, info = load_checkpoint(args.checkpoint, import_permission(args))
    require_quantized(args, info)
    model = model.to(getattr(args, "device", None) or "cpu")
    # Evaluate on the test split the model was trained against (digits' split depends on the
    # seed it was made with): anything else would leak training images into the test set.
    meta = info["meta"] or {}
    trained_on = meta.get("dataset")
    if trained_on is not None and trained_on != args.dataset:
        option = "--data" if ":" in str(trained_on) else "--dataset"
        raise QfvError(f"{args.checkpoint} was trained on {option} {trained_on}, not "
                       f"{args.dataset}: pass {option} {trained_on}"
                       + (" --data-dir DIR" if trained_on == "idx" else ""))
    train, test, num_classes, shape = load_dataset(args.dataset, args.data_dir,
                                                   int(meta.get("data_seed", 0)))
    if tuple(shape) != tuple(info["input_shape"]) or num_classes != info["num_classes"]:
        raise QfvError(
            f"{args.checkpoint} was trained on inputs {tuple(info['input_shape'])} with "
            f"{info['num_classes']} classes, but --dataset {args.dataset}"
            + (f" --data-dir {args.data_dir}" if args.data_dir else "")
            + f" has {tuple(shape)} and {num_classes}")
    if meta.get("data_sha256") and meta["data_sha256"] != fingerprint(train, test):
        where = f"--data-dir {args.data_dir}" if args.data_dir else f"--dataset {args.dataset}"
        raise QfvError(f"{where} is not the data {args.checkpoint} was trained and tested on "
                       "(its images or labels differ): evaluating on other data would "
                       "report a wrong accuracy; pass the same data")
    if getattr(args, "threads", None) == "auto":
        from qfv_brevitas.util.threads import auto_threads, set_threads

        set_threads(auto_threads(model, test[0][0][None].to(next(model.parameters()).device),
                                 64))
    return model, info, train, test


def meta_of(info) -> dict:
    """The checkpoint's metadata, as a new dict."""
    return dict(info.get("meta") or {})
