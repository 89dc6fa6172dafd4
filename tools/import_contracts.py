"""Two import-linter contract types that the built-in ones cannot express (used by
[tool.importlinter] in pyproject.toml, run by `make test`).

- ``only_imports``: each source module may import, of the root package, only the listed modules.
- ``sole_importer``: only the listed modules may import a submodule of an external package
  (import-linter keeps external packages whole, so ``torch.distributed`` is found in the
  import lines grimp recorded for imports of ``torch``).
"""

from __future__ import annotations

import re

from importlinter import Contract, ContractCheck, fields, output


class OnlyImportsContract(Contract):
    type_name = "only_imports"

    source_modules = fields.ListField(subfield=fields.ModuleField())
    allowed_modules = fields.ListField(subfield=fields.ModuleField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        allowed = {m.name for m in self.allowed_modules}
        found = []
        for source in self.source_modules:
            root = source.name.split(".")[0]
            for imported in sorted(graph.find_modules_directly_imported_by(source.name)):
                inside = imported == root or imported.startswith(root + ".")
                if inside and imported not in allowed and not any(imported.startswith(a + ".") for a in allowed):
                    found.append((source.name, imported))
        return ContractCheck(kept=not found, metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for source, imported in check.metadata["found"]:
            output.print_error(f"{source} imports {imported}, which is not among {sorted(m.name for m in self.allowed_modules)}")


class SoleImporterContract(Contract):
    type_name = "sole_importer"

    external_module = fields.StringField()
    importers = fields.ListField(subfield=fields.ModuleField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        target = self.external_module
        top = target.split(".")[0]
        rest = re.escape(target[len(top) + 1:])
        pattern = re.compile(rf"\b{re.escape(target)}\b|from\s+{top}\s+import\s+.*\b{rest}\b")
        allowed = {m.name for m in self.importers}
        found = []
        for importer in sorted(graph.find_modules_that_directly_import(top)):
            if importer in allowed:
                continue
            for detail in graph.get_import_details(importer=importer, imported=top):
                if pattern.search(detail["line_contents"]):
                    found.append((importer, detail["line_number"], detail["line_contents"]))
        return ContractCheck(kept=not found, metadata={"found": found})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for importer, line, text in check.metadata["found"]:
            output.print_error(f"{importer}:{line} imports {self.external_module} ({text!r}); only "
                               f"{', '.join(m.name for m in self.importers)} may")


class AcyclicModulesContract(Contract):
    """No cycle in the graph of modules under ``package`` (a package's __init__ counts as the
    package's module): Tarjan's strongly connected components, iteratively."""

    type_name = "acyclic_modules"

    package = fields.ModuleField()

    def check(self, graph, verbose: bool) -> ContractCheck:
        root = self.package.name
        modules = sorted(m for m in graph.modules if m == root or m.startswith(root + "."))
        edges = {m: sorted(i for i in graph.find_modules_directly_imported_by(m) if i in modules and i != m)
                 for m in modules}
        index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]
        for start in modules:
            if start in index:
                continue
            work = [(start, iter(edges[start]))]
            index[start] = low[start] = counter[0]
            counter[0] += 1
            stack.append(start)
            on_stack.add(start)
            while work:
                node, children = work[-1]
                child = next(children, None)
                if child is None:
                    work.pop()
                    if work:
                        low[work[-1][0]] = min(low[work[-1][0]], low[node])
                    if low[node] == index[node]:
                        component = []
                        while True:
                            member = stack.pop()
                            on_stack.discard(member)
                            component.append(member)
                            if member == node:
                                break
                        if len(component) > 1:
                            cycles.append(sorted(component))
                elif child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
        return ContractCheck(kept=not cycles, metadata={"cycles": cycles})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for cycle in check.metadata["cycles"]:
            output.print_error("these modules import each other in a circle: " + ", ".join(cycle))
