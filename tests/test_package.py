"""Tests of the package surface: the public names, and a light import for the command line."""

import subprocess
import sys

import pkd


def test_public_names_resolve():
    assert pkd.__all__ == sorted(pkd._EXPORTS) and len(pkd.__all__) <= 13
    for name in pkd.__all__:
        assert getattr(pkd, name) is not None
    assert "pkd_loss" in dir(pkd)


def test_unknown_attribute():
    try:
        pkd.no_such_thing  # noqa: B018
    except AttributeError as error:
        assert "no_such_thing" in str(error)
    else:
        raise AssertionError("expected AttributeError")


def test_importing_the_cli_does_not_load_torch():
    code = "import sys, pkd, pkd.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "False"


def _pkd_imports(path, package_root):
    """The pkd modules a source file imports, at module level or inside functions."""
    import ast

    tree = ast.parse(path.read_text())
    module = ".".join(path.relative_to(package_root.parent).with_suffix("").parts).removesuffix(".__init__")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("pkd")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package
                package = module.split(".")[: -node.level] if path.name != "__init__.py" else module.split(".")
                base = ".".join([*package[: len(package) - node.level + 1], base]).strip(".")
            if base.startswith("pkd"):
                found.add(base)
    return module, found


def test_no_import_cycles():
    """No pkd module imports itself back through others, function-level imports included."""
    from pathlib import Path

    root = Path(pkd.__file__).parent
    graph = {}
    for path in sorted(root.rglob("*.py")):
        module, imported = _pkd_imports(path, root)
        graph[module] = imported
    # pkd/__init__ re-exports lazily (only under TYPE_CHECKING), and a module's package is not its import.
    graph.pop("pkd")
    graph = {m: {i for i in deps if i in graph and i != m and not m.startswith(i + ".")} for m, deps in graph.items()}
    assert len(graph) > 15
    cycles, state = [], {}

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, [*stack, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
