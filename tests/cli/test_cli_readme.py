"""Every ``qfv`` subcommand, option and named choice in README.md is run by a test.

README.md's ``qfv ...`` commands (inline code and code blocks) and the options of its
"Options:" paragraph are resolved against the real parsers (:func:`qfv_brevitas.cli.app.build_parser`):
a README that names a command, option or choice the parser does not have fails here. Then
each must appear in a ``main([...])`` call of the test suite that is expected to succeed (read
from the test sources: string literals, module-level lists spliced in with ``*``, and
``pytest.mark.parametrize`` values), with the README's choice values among its arguments.
Every leaf subcommand of the parser is run by a test as well, whether README names it or not.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import pytest

from qfv_brevitas.cli.app import build_parser

ROOT = Path(__file__).resolve().parents[2]
Path_ = Tuple[str, ...]


# -- the parser --------------------------------------------------------------------------------

def _children(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _all_parsers() -> Dict[Path_, argparse.ArgumentParser]:
    out, stack = {}, [((), build_parser())]
    while stack:
        path, p = stack.pop()
        out[path] = p
        stack.extend((path + (name,), c) for name, c in _children(p).items())
    return out


PARSERS = _all_parsers()
LEAVES = sorted(p for p, parser in PARSERS.items() if p and not _children(parser))


def _option(path: Path_, opt: str) -> Optional[argparse.Action]:
    for action in PARSERS[path]._actions:
        if opt in action.option_strings:
            return action
    return None


# -- what README names ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Claim:
    """README names option ``opt`` (with choice ``value``, or None) on one of ``paths``; or,
    with ``opt`` None, the command ``paths[0]`` itself."""
    paths: Tuple[Path_, ...]
    opt: Optional[str]
    value: Optional[str]
    where: str

    def __str__(self):
        cmds = " | ".join("qfv " + " ".join(p) for p in self.paths)
        what = self.opt or "(the command)"
        return f"{cmds}: {what}{' ' + self.value if self.value else ''}   [README: {self.where}]"


def _resolve_paths(tokens: List[str], where: str) -> Tuple[List[Path_], List[str]]:
    """Leading command words of a README mention -> the command paths they name, and the
    rest of the tokens. ``a|b`` names alternatives, ``...`` every subcommand, and
    ``train/demo/faults finetune`` several commands (a word after ``/`` starts again at the
    top when it is not a subcommand of the path before)."""
    paths: List[Path_] = [()]
    i = 0
    while i < len(tokens) and any(_children(PARSERS[p]) for p in paths):
        tok = tokens[i]
        if tok.startswith("-"):
            break
        new: List[Path_] = []
        if tok == "...":
            for p in paths:
                kids = _children(PARSERS[p])
                new += [p + (k,) for k in kids] if kids else [p]
        else:
            parts = tok.split("/")
            for k, part in enumerate(parts):
                alts = part.split("|")
                grown = False
                for p in (paths if k == 0 else [p for p in paths if not new or p in new]):
                    if all(a in _children(PARSERS[p]) for a in alts):
                        new += [p + (a,) for a in alts]
                        grown = True
                if k > 0 and not grown and all(a in _children(PARSERS[()]) for a in alts):
                    new += [(a,) for a in alts]  # "train/demo": another top-level command
                    grown = True
                if not grown:
                    raise AssertionError(f"README {where!r}: {part!r} is not a qfv subcommand "
                                         f"here (commands: {sorted(_children(PARSERS[()]))})")
            new += [p for p in paths if not _children(PARSERS[p]) and p not in new]
            new = [p for p in new if p != ()]
        paths = list(dict.fromkeys(new))
        i += 1
    return paths, tokens[i:]


_PLACEHOLDER = re.compile(r"^([A-Z][A-Z0-9_]*|\.\.\.|[-+]?[0-9.e-]+|\S*[/.~]\S*)$")


def _claims_of(mention: str, paths: Optional[List[Path_]], where: str) -> List[Claim]:
    text = re.sub(r"[\[\]()]", " ", mention)
    tokens = text.split()
    if paths is None:
        paths, tokens = _resolve_paths(tokens, where)
        claims = [Claim((p,), None, None, where) for p in paths]
    else:
        claims = []
    opt: Optional[List[str]] = None
    for tok in tokens:
        if tok == "|":
            continue
        if tok.startswith("--"):
            opt = [o for o in tok.split("/") if o]
            for o in opt:
                accepting = tuple(p for p in paths if _option(p, o) is not None)
                assert accepting, f"README {where!r}: no command among " \
                                  f"{['qfv ' + ' '.join(p) for p in paths]} has {o}"
                claims.append(Claim(accepting, o, None, where))
            continue
        if opt is None:
            continue  # a positional argument (CKPT, m.onnx, ...)
        for value in tok.split("|"):
            for o in opt:
                accepting = tuple(p for p in paths if _option(p, o) is not None)
                choices = {c for p in accepting for c in (_option(p, o).choices or ())}
                if value in choices:
                    claims.append(Claim(accepting, o, value, where))
                elif choices and not _PLACEHOLDER.match(value):
                    raise AssertionError(f"README {where!r}: {value!r} is not a choice of {o} "
                                         f"({sorted(choices)})")
    return claims


def readme_claims(text: str) -> List[Claim]:
    text = text.replace("\\|", "|")
    mentions = re.findall(r"`(qfv [^`\n]+)`", text)
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        mentions += [ln.split("#")[0].strip() for ln in block.splitlines()
                     if ln.strip().startswith("qfv ")]
    claims: List[Claim] = []
    for m in mentions:
        claims += _claims_of(m[len("qfv "):], None, m)
    para = re.search(r"^Options: (.*?)\n\n", text, re.S | re.M)
    assert para, "README.md has no 'Options:' paragraph"
    everywhere = [p for p in PARSERS if p]
    for span in re.findall(r"`(--[^`]+)`", para.group(1)):
        claims += _claims_of(span, everywhere, "Options: " + span)
    return claims


# -- what the tests run --------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    path: Path_
    args: Tuple[str, ...]  # after the command words; None-valued expressions as "<expr>"
    where: str


def _const_str(node) -> Optional[str]:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _str_list(node) -> Optional[List[str]]:
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_const_str(e) or "<expr>" for e in node.elts]
    return None


def _parametrized(func: ast.FunctionDef) -> List[Tuple[List[str], List[ast.AST]]]:
    """``(argnames, cases)`` of each ``pytest.mark.parametrize`` decorator."""
    out = []
    for dec in func.decorator_list:
        if isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "parametrize":
            names = _const_str(dec.args[0])
            if names is None or not isinstance(dec.args[1], (ast.List, ast.Tuple)):
                continue
            names = [n.strip() for n in names.split(",")]
            out.append((names, list(dec.args[1].elts)))
    return out


def _case_value(names: List[str], case: ast.AST, name: str) -> ast.AST:
    if len(names) == 1:
        return case
    if isinstance(case, ast.Call) and getattr(case.func, "attr", "") == "param":
        case = case.args[0] if len(case.args) == 1 else ast.Tuple(elts=case.args)
    return case.elts[names.index(name)]


def _expansions(elts, consts, params) -> List[List[str]]:
    """All argument lists a ``main([...])`` literal stands for."""
    used = {n.id for e in elts for n in ast.walk(e) if isinstance(n, ast.Name)}
    decorators = [(names, cases) for names, cases in params if used & set(names)]
    combos = itertools.product(*[[(names, c) for c in cases] for names, cases in decorators])
    out = []
    for combo in combos or [()]:
        binding = {n: _case_value(names, case, n) for names, case in combo for n in names}
        argv: List[str] = []
        for e in elts:
            if isinstance(e, ast.Starred) and isinstance(e.value, ast.Name):
                node = binding.get(e.value.id, consts.get(e.value.id))
                vals = _str_list(node) if node is not None else None
                argv += vals if vals is not None else ["<expr>"]
            elif isinstance(e, ast.Name) and e.id in binding:
                argv.append(_const_str(binding[e.id]) or "<expr>")
            elif isinstance(e, ast.Name) and e.id in consts and _const_str(consts[e.id]):
                argv.append(_const_str(consts[e.id]))
            else:
                argv.append(_const_str(e) or "<expr>")
        out.append(argv)
    return out


def _list_elts(node) -> Optional[List[ast.AST]]:
    """Elements of ``[...]`` or ``[...] + x + [...]`` (a non-list operand spliced like ``*x``)."""
    if isinstance(node, (ast.List, ast.Tuple)):
        return list(node.elts)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _list_elts(node.left), _list_elts(node.right)
        if left is None and right is None:
            return None
        return ((left if left is not None else [ast.Starred(value=node.left)])
                + (right if right is not None else [ast.Starred(value=node.right)]))
    return None


def _expects_failure(call: ast.Call, parents: Dict[ast.AST, ast.AST]) -> bool:
    """``assert main(...) == k`` with k != 0, or inside ``pytest.raises(...)``."""
    node = call
    while node in parents:
        parent = parents[node]
        if isinstance(parent, ast.Compare) and parent.left is node and len(parent.ops) == 1 \
                and isinstance(parent.ops[0], ast.Eq):
            k = parent.comparators[0]
            return not (isinstance(k, ast.Constant) and k.value == 0)
        if isinstance(parent, ast.With) and any(
                isinstance(i.context_expr, ast.Call)
                and getattr(i.context_expr.func, "attr", "") == "raises" for i in parent.items):
            return True
        node = parent
    return False


def _split_path(argv: Sequence[str]) -> Tuple[Path_, Tuple[str, ...]]:
    path: Path_ = ()
    i = 0
    while i < len(argv) and argv[i] in _children(PARSERS[path]):
        path += (argv[i],)
        i += 1
    return path, tuple(argv[i:])


def runs_in(files: Sequence[Path]) -> List[Run]:
    runs = []
    for f in files:
        tree = ast.parse(f.read_text())
        names = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                 and node.module == "qfv_brevitas.cli.app" for a in node.names if a.name == "main"}
        if not names:
            continue
        consts = {t.id: node.value for node in tree.body if isinstance(node, ast.Assign)
                  for t in node.targets if isinstance(t, ast.Name)}
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef):
                continue
            # parametrized arguments, and loops over literal values (``for m in ("a", "b")``)
            params = _parametrized(func) + [
                ([loop.target.id], list(loop.iter.elts)) for loop in ast.walk(func)
                if isinstance(loop, ast.For) and isinstance(loop.target, ast.Name)
                and isinstance(loop.iter, (ast.List, ast.Tuple))]
            for call in ast.walk(func):
                if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                        and call.func.id in names and call.args):
                    continue
                elts = _list_elts(call.args[0])
                if elts is None or _expects_failure(call, parents):
                    continue
                for argv in _expansions(elts, consts, params):
                    path, args = _split_path(argv)
                    runs.append(Run(path, args, f"{f.name}:{call.lineno}"))
    return runs


def _runs_option(run: Run, opt: str, value: Optional[str]) -> bool:
    args = run.args
    for i, a in enumerate(args):
        if a == opt or a.startswith(opt + "="):
            if value is None:
                return True
            vals = [a.split("=", 1)[1]] if "=" in a else list(
                itertools.takewhile(lambda v: not v.startswith("--"), args[i + 1:]))
            if value in vals:
                return True
    return False


def _exercised(claim: Claim, runs: List[Run]) -> bool:
    for run in runs:
        if claim.opt is None:  # a command (or a group, e.g. `qfv faults`): any run under it
            if any(run.path[:len(p)] == p for p in claim.paths):
                return True
            continue
        if run.path not in claim.paths:
            continue
        if claim.opt is None or _runs_option(run, claim.opt, claim.value):
            return True
    return False


# -- the tests -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs():
    return runs_in(sorted((ROOT / "tests").rglob("test_*.py")))


def test_every_command_option_and_choice_readme_names_is_run_by_a_test(runs):
    claims = readme_claims((ROOT / "README.md").read_text())
    assert len(claims) > 50  # the README's commands were found at all
    missing = sorted({str(c) for c in claims if not _exercised(c, runs)})
    assert not missing, "named in README.md but run by no test:\n  " + "\n  ".join(missing)


def test_every_subcommand_is_run_by_a_test(runs):
    ran = {r.path for r in runs}
    missing = [" ".join(p) for p in LEAVES if p not in ran]
    assert not missing, f"qfv subcommands no test runs: {missing}"


def test_the_checker_sees_what_it_should():
    """The reader of README and of the tests on made-up input: alternatives, ``...``, ``/``,
    placeholders, parametrized and spliced arguments, expected failures left out."""
    claims = _claims_of("variability sample|eval CKPT --sigmas 0 0.1 [--distribution lognormal]",
                        None, "x")
    assert {(c.paths, c.opt, c.value) for c in claims} == {
        ((("variability", "sample"),), None, None), ((("variability", "eval"),), None, None),
        ((("variability", "eval"),), "--sigmas", None),
        ((("variability", "sample"), ("variability", "eval")), "--distribution", None),
        ((("variability", "sample"), ("variability", "eval")), "--distribution", "lognormal")}
    paths, _ = _resolve_paths("train/demo/faults finetune/variability finetune".split(), "x")
    assert set(paths) == {("train",), ("demo",), ("faults", "finetune"),
                          ("variability", "finetune")}
    paths, rest = _resolve_paths("faults eval qfv-snn/nmult_w4.pt".split(), "x")
    assert paths == [("faults", "eval")] and rest == ["qfv-snn/nmult_w4.pt"]
    with pytest.raises(AssertionError, match="no command"):
        _claims_of("report CKPT --rates 0", None, "x")
    with pytest.raises(AssertionError, match="not a choice"):
        _claims_of("export CKPT --form planar", None, "x")
    with pytest.raises(AssertionError, match="not a qfv subcommand"):
        _claims_of("faults evaluate CKPT", None, "x")
    src = '''
from qfv_brevitas.cli.app import main
FAST = ["--qat-epochs", "1"]

@pytest.mark.parametrize("form, other", [("fixed", 1), ("compact", 2)])
def test_a(form, other):
    assert main(["export", str(x), "--form", form, *FAST]) == 0
    assert main(["export", "--form", "bitplanes"]) == 2
    assert main(["inspect", "--json"] + extra) == 0
    for ckpt in ("a.pt", "b.pt"):
        main(["report", ckpt])
    with pytest.raises(SystemExit):
        main(["export", "--exporter", "jit"])
'''
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "test_x.py"
        f.write_text(src)
        found = runs_in([f])
    assert [(r.path, r.args) for r in found] == [
        (("export",), ("<expr>", "--form", "fixed", "--qat-epochs", "1")),
        (("export",), ("<expr>", "--form", "compact", "--qat-epochs", "1")),
        (("inspect",), ("--json", "<expr>")),
        (("report",), ("a.pt",)), (("report",), ("b.pt",))]
    claim = Claim(((("export",)),), "--form", "compact", "x")
    assert _exercised(claim, found)
    assert not _exercised(Claim(((("export",)),), "--form", "bitplanes", "x"), found)
