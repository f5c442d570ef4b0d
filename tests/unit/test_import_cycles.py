"""No module imports another that imports it back, directly or through others.

import-linter's `acyclic_siblings` contract (pyproject.toml, run by `make test`) checks cycles between sibling
modules and packages; it cannot see a cycle between a package's `__init__` and its own submodules (a registry
in `__init__` that every submodule imports, say). This test checks every module against every other.
"""

from __future__ import annotations

import grimp


def module_cycles(graph: grimp.ImportGraph) -> list[tuple[str, ...]]:
    """One chain per module pair (a imports b, b reaches a): a, b, ..., a."""
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            back = graph.find_shortest_chain(importer=imported, imported=importer)
            if back is not None and importer < imported:
                cycles.append((importer, *back))
    return cycles


def test_no_module_imports_one_that_imports_it_back():
    assert module_cycles(grimp.build_graph("services", "trainer")) == []
