"""The package's shape, as a newcomer relies on it: its modules import each other without a cycle
(counting the imports inside functions, which only hide one), and the factory only wires."""
import ast
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / 'app'


def module_name(path):
    parts = path.relative_to(APP.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def app_imports():
    """{module: {app module it imports}}, for every module of the package."""
    modules = {module_name(path): path for path in APP.rglob('*.py')}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module in modules:
                # `from app import jobs` imports the module app.jobs; `from app.models import Job`, app.models.
                for alias in node.names:
                    imported.add(f'{node.module}.{alias.name}' if f'{node.module}.{alias.name}' in modules
                                 else node.module)
        graph[name] = imported - {name}
    return graph


def find_cycle(graph):
    """:return: one cycle as a list of modules, or None."""
    state, path = {}, []

    def visit(module):
        state[module] = 'open'
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 'open':
                return path[path.index(imported):] + [imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        state[module] = 'done'
        path.pop()
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_the_checker_finds_a_cycle_through_an_import_inside_a_function():
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
    assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None


def test_the_package_has_no_import_cycle():
    graph = app_imports()
    assert 'app.jobs' in graph and 'app.sending' in graph['app.drip'], 'the graph is read'
    assert find_cycle(graph) is None, ' -> '.join(find_cycle(graph))


def test_the_job_runner_knows_nothing_of_mail():
    assert not app_imports()['app.jobs'] & {'app.transports', 'app.failures', 'app.email', 'app.sending',
                                            'app.schedules', 'app.drip', 'app.broadcasts'}


def test_the_factory_only_wires():
    """app/__init__.py holds create_app and nothing else: no extension, no helper to import upward."""
    tree = ast.parse((APP / '__init__.py').read_text())
    defined = [node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    assigned = [node for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))]
    assert (defined, assigned) == (['create_app'], [])
    assert not any(module.startswith('app') and module != 'app' and 'app' in imported
                   for module, imported in app_imports().items()), 'nothing imports from the factory package'


def test_the_readmes_layout_table_names_every_module_and_package():
    readme = (APP.parent / 'README.md').read_text()
    layout = readme[readme.index('## Layout'):]
    parts = [path for path in APP.glob('*.py')] + [path for path in APP.iterdir() if (path / '__init__.py').exists()]
    missing = [str(path.relative_to(APP.parent)) for path in parts
               if f'`{path.relative_to(APP.parent)}{"/" if path.is_dir() else ""}`' not in layout]
    assert len(parts) > 20 and missing == []
