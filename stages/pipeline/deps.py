"""Which of the project's files can change a stage's outputs, derived from the code that `python -m stages.X`
runs: dvc.yaml's deps and the train stage's checkpoint hash both follow it, so neither is a list kept by hand.

The walk follows names, not whole modules: a stage depends on the definitions its module uses, on those
that these use, and so on; a file is a dependency when one of its definitions is reached (or, rarely, when
importing it runs statements of its own). So a stage that calls `atomic_save` from ddpm/checkpoint.py does
not depend on the networks that `load_model` in the same file builds. Names imported from a package
(`from ddpm import Trainer`) resolve through its `__init__`'s re-exports to the module that defines them.
Only the project's own packages are followed; the installed libraries are pinned by requirements.txt.

usage: python -m stages.pipeline.deps   (each dvc.yaml stage's derived code deps, and what dvc.yaml lacks)
"""

import ast
import functools
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ddpm", "stages")  # the project's own code; everything else is an installed library

FIGURE_STAGES = ("stages.evaluate", "stages.visualize")  # stages whose outputs are figures
# Files (or one definition in a file, "path:name") that may change without rerunning the stages that use them:
# the walk neither lists nor follows them, except for the stages named beside each, which do depend on them.
NO_RERUN = {
    # MLflow tracking: what these write lives in the MLflow store, in no output that DVC caches, and what
    # they read back (a resumed run's last logged step, registered versions) only decides what to log next.
    "stages/pipeline/tracking.py": (),
    "stages/pipeline/store.py": (),
    "stages/pipeline/parent_run.py": (),
    "stages/pipeline/system_metrics.py": (),
    "stages/pipeline/registry.py": (),
    "stages/pipeline/mlflow_model.py": (),
    # Figure drawing: the train and sample stages save previews (sample grids, loss.png) beside their models
    # and samples, and redrawing a preview is not worth a retrain or a resample.
    "ddpm/pictures.py": FIGURE_STAGES,
    "stages/pipeline/plots.py": FIGURE_STAGES,
    # Validation only: the range and choice checks (and through them bounds.py and the libraries' lists of
    # choices) stop absurd params before any work or let the run go, and never change what it writes; the check
    # stage's output is that verdict.
    "stages/pipeline/params.py:_checks": ("stages.check",),
    # The hold on the workspace lets a stage run or stops it, and changes nothing it writes; the profile stage
    # reads there which keys -S set, which decides the values it writes.
    "stages/pipeline/workspace.py": ("stages.profile",),
    # Writing files: how an output is put in place (a temporary beside it, synced, then one rename) and how a full
    # disk is reported, never what the output holds.
    "ddpm/files.py": (),
    # How many images a sampling batch holds never changes them (each image's noise is its own); index.json
    # records it beside the timings.
    "stages/pipeline/bounds.py:sample_batch_size": (),
}


class Module:
    """One parsed module: its top-level definitions (name -> the statements that bind it), the names its
    imports bind (name -> (module, attribute or None for the module itself)) and the statements that run
    for their effect when it is imported."""

    def __init__(self, name: str, path: Path, root: Path):
        self.name, self.path = name, path.relative_to(root).as_posix()
        self.package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        self.defs: dict[str, list[ast.AST]] = {}
        self.imports: dict[str, tuple[str, str | None]] = {}
        self.effects: list[ast.AST] = []
        self.main: list[ast.AST] = []  # `if __name__ == "__main__":`, run only when it is the stage itself
        self._read(ast.parse(path.read_text(), str(path)).body)

    def _read(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                self.imports.update(bindings(stmt, self.package))
            elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.defs.setdefault(stmt.name, []).append(stmt)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                for name in {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}:
                    self.defs.setdefault(name, []).append(stmt)
            elif isinstance(stmt, ast.If) and ast.unparse(stmt.test) == "__name__ == '__main__'":
                self.main.append(stmt)
            elif isinstance(stmt, (ast.If, ast.Try)):  # conditional imports and definitions
                self.effects += [stmt.test] if isinstance(stmt, ast.If) else []
                for block in (stmt.body, stmt.orelse, getattr(stmt, "finalbody", []),
                              *(h.body for h in getattr(stmt, "handlers", []))):
                    self._read(block)
            elif not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)):  # not a docstring
                self.effects.append(stmt)


@functools.lru_cache(maxsize=512)
def parse(name: str, path: Path, root: Path, mtime_ns: int) -> Module:
    """Module `name` at `path`, parsed once per version of the file (`mtime_ns`): every stage's walk reads it."""
    return Module(name, path, root)


def bindings(stmt: ast.Import | ast.ImportFrom, package: str) -> dict[str, tuple[str, str | None]]:
    """The names an import statement binds, each to (module, attribute or None for the module itself)."""
    if isinstance(stmt, ast.Import):
        return {a.asname or a.name.partition(".")[0]: (a.name if a.asname else a.name.partition(".")[0], None)
                for a in stmt.names}
    base = package.rsplit(".", stmt.level - 1)[0] if stmt.level else ""
    module = ".".join(filter(None, [base, stmt.module]))
    if any(a.name == "*" for a in stmt.names):
        raise ValueError(f"{package}: `from {module} import *` hides which names it uses; import them by name")
    return {a.asname or a.name: (module, a.name) for a in stmt.names}


class References(ast.NodeVisitor):
    """The dotted names (`x`, `ddpm.samplers.generate` as [ddpm, samplers, generate]) a definition reads,
    and the names its own (local) imports bind. Function annotations are skipped: they run nothing."""

    def __init__(self, package: str):
        self.package, self.chains, self.local = package, [], {}

    def visit_Name(self, node: ast.Name) -> None:
        if not isinstance(node.ctx, ast.Store):
            self.chains.append([node.id])

    def visit_Attribute(self, node: ast.Attribute) -> None:
        parts, value = [node.attr], node.value
        while isinstance(value, ast.Attribute):
            parts, value = [value.attr, *parts], value.value
        if isinstance(value, ast.Name):
            self.chains.append([value.id, *parts])
        else:
            self.visit(value)

    def visit_Import(self, node) -> None:
        self.local.update(bindings(node, self.package))

    visit_ImportFrom = visit_Import

    def visit_FunctionDef(self, node) -> None:
        for part in (*node.decorator_list, *node.args.defaults, *filter(None, node.args.kw_defaults), *node.body):
            self.visit(part)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_arg(self, node) -> None:
        """An argument's annotation names a type; it runs no code of the stage, so it is not followed."""


class Walk:
    """The project files that the module `stage` (e.g. "stages.train") runs, under `root`, each with the
    definition that first reached it (`files`: path -> "module.name")."""

    def __init__(self, stage: str, root: Path = ROOT):
        self.stage, self.root = stage, Path(root)
        self.modules: dict[str, Module | None] = {}
        self.files: dict[str, str] = {}
        self.seen: set[tuple[str, str | None]] = set()
        self.imported: set[str] = set()
        if self.module(stage) is None:
            raise ValueError(f"no module {stage} under {root}")
        self.todo = [(stage, None, stage)]
        while self.todo:
            self.visit(*self.todo.pop())

    def module(self, name: str) -> Module | None:
        """The parsed project module `name`; None for a library module."""
        if name not in self.modules:
            base = self.root.joinpath(*name.split("."))
            path = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
            ok = name.partition(".")[0] in PACKAGES and path is not None
            self.modules[name] = parse(name, path, self.root, path.stat().st_mtime_ns) if ok else None
        return self.modules[name]

    def allowed(self, module: Module, attr: str | None = None) -> bool:
        """Whether `module` (or its definition `attr`) may change without rerunning this stage (NO_RERUN)."""
        key = f"{module.path}:{attr}" if attr else module.path
        return any(k in NO_RERUN and self.stage not in NO_RERUN[k] for k in {module.path, key})

    def visit(self, name: str, attr: str | None, via: str) -> None:
        """Reach definition `attr` of module `name` (None: the whole module, as a stage runs its own) from the
        definition `via`."""
        module = self.module(name)
        if (name, attr) in self.seen or module is None or self.allowed(module, attr):
            return
        self.seen.add((name, attr))
        self.on_import(module)
        self.files.setdefault(module.path, via)
        whole = [n for nodes in module.defs.values() for n in nodes] + module.effects
        for node in (whole + (module.main if name == self.stage else [])) if attr is None else module.defs[attr]:
            self.read(module, node, f"{name}.{attr}" if attr else name)

    def on_import(self, module: Module) -> None:
        """What importing `module` runs: its packages' and its own top-level statements and, in turn, its
        imports'."""
        if module.name in self.imported or self.allowed(module):
            return
        self.imported.add(module.name)
        parts = module.name.split(".")
        packages = [self.module(".".join(parts[:i])) for i in range(1, len(parts))]
        imported = [self.module(target) for target, _ in module.imports.values()]
        for other in filter(None, packages + imported):
            self.on_import(other)
        for node in module.effects:
            self.files.setdefault(module.path, f"{module.name} (on import)")
            self.read(module, node, module.name)

    def read(self, module: Module, node: ast.AST, where: str) -> None:
        """Queue what `node`, a statement of `module` within definition `where`, reads from the project."""
        refs = References(module.package)
        refs.visit(node)
        for first, *rest in refs.chains:
            found = (refs.local.get(first) or module.imports.get(first)
                     or ((module.name, first) if first in module.defs else None))
            if found is not None and found[1] is not None:
                found = self.resolve(*found)
            while found is not None and found[1] is None and rest:  # a module's attribute: ddpm.samplers.generate
                found = self.resolve(found[0], rest.pop(0))
            if found is not None:
                self.todo.append((*found, where))

    def resolve(self, name: str, attr: str) -> tuple[str, str | None] | None:
        """Where attribute `attr` of module `name` is defined: the module's own definition, the module that a
        re-export imports it from, or a submodule of a package; None for a library's or an unknown name."""
        module = self.module(name)
        if module is None:
            return None
        if attr in module.defs:
            return name, attr
        if attr in module.imports:
            target, inner = module.imports[attr]
            return self.resolve(target, inner) if inner is not None else (target, None)
        return (f"{name}.{attr}", None) if self.module(f"{name}.{attr}") is not None else None


def code_deps(stage: str, root: Path = ROOT) -> set[str]:
    """The project files (paths relative to `root`) that can change the outputs of `python -m stage`."""
    return set(Walk(stage, root).files)


def stage_modules(root: Path = ROOT) -> dict[str, str]:
    """Each dvc.yaml stage's module, from its cmd (`python -m stages.X ...`)."""
    stages = yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        cmd = stage.get("do", stage)["cmd"]
        match = re.match(r"python -m ([\w.]+)", " ".join(cmd) if isinstance(cmd, list) else cmd)
        if match is None:
            raise ValueError(f"dvc.yaml stage {name}: its cmd {cmd!r} does not run `python -m <module>`")
        out[name] = match.group(1)
    return out


def mismatches(root: Path = ROOT) -> list[str]:
    """One line per dvc.yaml stage whose code deps differ from those its module's imports give."""
    stages = yaml.safe_load((Path(root) / "dvc.yaml").read_text())["stages"]
    lines = []
    for name, module in stage_modules(root).items():
        listed = {d for d in stages[name].get("do", stages[name]).get("deps", []) if d.endswith(".py")}
        derived = Walk(module, root).files
        if lacks := sorted(set(derived) - listed):
            why = ", ".join(f"{path} (used by {derived[path]})" for path in lacks)
            lines.append(f"dvc.yaml stage {name} ({module}) lacks deps {why}: list them, or, if they cannot "
                         "change its outputs, add them to NO_RERUN in stages/pipeline/deps.py with the reason")
        if extra := sorted(listed - set(derived)):
            lines.append(f"dvc.yaml stage {name} ({module}) lists deps {extra} that its code does not import")
    return lines


if __name__ == "__main__":
    for name, module in stage_modules().items():
        files = Walk(module).files
        print(f"{name}:", *(f"{path}  # {files[path]}" for path in sorted(files)), sep="\n  - ")
    problems = mismatches()
    print(*problems, sep="\n", file=sys.stderr)
    sys.exit(1 if problems else 0)
