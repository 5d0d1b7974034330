"""The package's shape, read from its source: layers, no import cycles, no private names
crossing modules, and a top-level import free of plotting and experiment code.

Layers, lowest first (a module may import its own layer and the ones below it, never above):
``util`` < ``core`` < ``training`` < ``chip`` < ``zoo`` < ``studies`` < ``snn`` < ``export`` <
``cli``; the top-level ``qfv_brevitas/__init__.py`` is the public face and may import any layer
below ``cli``. Every import counts, also one inside a function.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "qfv_brevitas"
LAYERS = ("util", "core", "training", "chip", "zoo", "studies", "snn", "export", "cli")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules():
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


MODULES = modules()


def resolve(mod: str, is_pkg: bool, level: int, name: str) -> str:
    if not level:
        return name
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(mod: str):
    """``(lineno, imported module, imported names)`` of every import in ``mod``."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("qfv_brevitas"):
                    out.append((node.lineno, a.name, []))
        elif isinstance(node, ast.ImportFrom):
            target = resolve(mod, path.name == "__init__.py", node.level, node.module or "")
            if not target.startswith("qfv_brevitas"):
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if subs:
                out += [(node.lineno, s, []) for s in subs]
                rest = [n for n in names if f"{target}.{n}" not in MODULES]
                if rest:
                    out.append((node.lineno, target, rest))
            else:
                out.append((node.lineno, target, names))
    return out


#: modules directly in the package that belong to a layer: ``python -m qfv_brevitas`` is the
#: command line
TOP_LEVEL = {"__main__": "cli"}


def layer_of(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) == 1:
        return len(LAYERS) - 0.5  # the top-level package: above everything but cli
    return LAYERS.index(TOP_LEVEL.get(parts[1], parts[1]))


def graph():
    g = {m: set() for m in MODULES}
    for m in MODULES:
        for _, target, _ in imports_of(m):
            if target in MODULES and target != m:
                g[m].add(target)
    return g


def test_every_module_is_in_a_layer():
    stray = [m for m in MODULES if m.count(".") >= 1
             and TOP_LEVEL.get(m.split(".")[1], m.split(".")[1]) not in LAYERS]
    assert not stray, f"modules outside the layers {LAYERS}: {stray}"


def test_no_import_cycles():
    g = graph()
    # Packages import their own modules (re-exports); a module importing its package's
    # __init__ would close a loop: both count.
    cycles, state, stack = [], {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_layer_imports_a_higher_one():
    bad = []
    for m in MODULES:
        for line, target, _ in imports_of(m):
            if target == "qfv_brevitas" and m != "qfv_brevitas":
                bad.append(f"{m}:{line} imports the top-level package")
            elif target in MODULES and layer_of(target) > layer_of(m):
                bad.append(f"{m}:{line} imports {target}")
    assert not bad, "lower layer importing a higher one:\n" + "\n".join(bad)


def test_no_private_name_used_outside_its_module():
    bad = []
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for line, target, names in imports_of(m):
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{m}:{line} imports {target}.{n}")
            if target.split(".")[-1].startswith("_") and target != m:
                bad.append(f"{m}:{line} imports private module {target}")
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(m, path.name == "__init__.py", node.level, node.module or "")
                for a in node.names:
                    if f"{target}.{a.name}" in MODULES:
                        aliases[a.asname or a.name] = f"{target}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in MODULES and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in aliases and node.attr.startswith("_") \
                    and not node.attr.startswith("__"):
                bad.append(f"{m}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used outside their module:\n" + "\n".join(sorted(set(bad)))


def test_importing_the_package_loads_no_plotting_or_experiment_code():
    code = ("import sys, qfv_brevitas; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('matplotlib', "
            "'qfv_brevitas.studies', 'qfv_brevitas.cli', 'qfv_brevitas.snn.experiment'))))); "
            "import matplotlib; print(matplotlib.get_backend() if 'matplotlib' in sys.modules "
            "else '')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={"PATH": "", "MPLBACKEND": ""}).stdout.split("\n")
    assert out[0] == "", f"import qfv_brevitas loaded {out[0]}"


# -- size and the export-form registry (issue 20) -------------------------------------------------
MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 80
#: functions allowed over MAX_FUNCTION_LINES, each with the reason it stays whole
LONG_FUNCTIONS = {
}


def long_functions():
    """``{"module:qualname": lines}`` of every function longer than MAX_FUNCTION_LINES
    (decorators excluded, docstring included)."""
    out = {}
    for m, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))

        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        n = child.end_lineno - child.lineno + 1
                        if n > MAX_FUNCTION_LINES:
                            out[f"{m}:{name}"] = n
                    walk(child, name + ".")
                else:
                    walk(child, prefix)

        walk(tree, "")
    return out


def test_no_module_over_800_lines():
    big = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    big = {m: n for m, n in big.items() if n > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {big}"


def test_no_function_over_80_lines_unless_listed_with_a_reason():
    found = long_functions()
    unlisted = {f: n for f, n in found.items() if f not in LONG_FUNCTIONS}
    assert not unlisted, (f"functions over {MAX_FUNCTION_LINES} lines (split them, or list "
                          f"them in LONG_FUNCTIONS with the reason they stay whole): {unlisted}")
    stale = sorted(set(LONG_FUNCTIONS) - set(found))
    assert not stale, f"LONG_FUNCTIONS lists functions that are short now or gone: {stale}"


def _mentions_form(node) -> bool:
    """An expression naming an export form: ``form``, ``x_form``, ``obj.form``,
    ``d["form"]``, ``d.get("form")``."""
    if isinstance(node, ast.Name):
        return node.id == "form" or node.id.endswith("_form")
    if isinstance(node, ast.Attribute):
        return node.attr == "form"
    if isinstance(node, ast.Subscript):
        return isinstance(node.slice, ast.Constant) and node.slice.value == "form"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
            and node.func.attr == "get" and node.args:
        return isinstance(node.args[0], ast.Constant) and node.args[0].value == "form"
    return False


def form_switches(source: str, forms) -> list:
    """Line numbers where ``source`` branches on an export form outside the registry: a
    comparison one side of which names a form, or a literal collection of form names."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(
                _mentions_form(n) for n in [node.left] + node.comparators):
            out.append(node.lineno)
        elif isinstance(node, (ast.Tuple, ast.List, ast.Set)) and len(node.elts) >= 2 and all(
                isinstance(e, ast.Constant) and e.value in forms for e in node.elts):
            out.append(node.lineno)
    return out


def test_the_form_switch_detector_catches_switches():
    forms = ("compact", "bitplanes", "fixed", "planes")
    assert form_switches('if form == "planes":\n    pass\n', forms) == [1]
    assert form_switches('x = args.form not in FIXED\n', forms) == [1]
    assert form_switches('y = info["form"] != "fixed"\n', forms) == [1]
    assert form_switches('z = meta.get("form") in ("a",)\n', forms) == [1]
    assert form_switches('FIXED = ("fixed", "planes")\n', forms) == [1]
    assert form_switches('v = variant == "fixed"\nw = ("fixed", "step")\n', forms) == []


def test_no_export_form_is_switched_on_outside_the_forms_registry():
    from qfv_brevitas.export.forms import form_names

    bad = []
    for m, path in MODULES.items():
        if m.startswith("qfv_brevitas.export.forms"):
            continue
        bad += [f"{m}:{line}" for line in form_switches(path.read_text(), form_names())]
    assert not bad, ("code that branches on an export form's name outside "
                     "qfv_brevitas/export/forms/ (ask the form: "
                     "qfv_brevitas.export.forms.form_named(name).<attribute>):\n"
                     + "\n".join(bad))
