"""The `trainer` package as Dataflow workers receive it (setup.py, MANIFEST.in).

With `--setup_file ./setup.py`, Beam's stager builds an sdist of this checkout
(`Stager._build_setup_package`: `python -m build --sdist` when `build` is
installed, else `python setup.py sdist --dist-dir DIR`) and every worker
pip-installs that tarball.  The tests build it with the stager itself, from a
copy of the tracked files only, and install it into a fresh virtual
environment, so a file setup.py needs but the sdist lacks fails here, not on
every worker.  `--no-deps --no-index` keeps the install offline: the pinned
stack is what the worker image already holds.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import venv

import pytest
from apache_beam.runners.portability.stager import Stager

from conftest import REPO

# Run in a subprocess: records every file that executing setup.py opens
# (setuptools included) and prints the list as JSON.
_OPENED_FILES = r'''
import json, os, runpy, sys
root = os.path.realpath(sys.argv[1])
opened = set()
def hook(event, args):
    if event == 'open' and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.path.realpath(os.fsdecode(args[0]))
        if (path.startswith(root + os.sep) and os.path.isfile(path)
                and '.egg-info' not in path):
            opened.add(os.path.relpath(path, root))
sys.addaudithook(hook)
os.chdir(root)
sys.argv = ['setup.py', '--name']
runpy.run_path('setup.py', run_name='__main__')
sys.stdout.flush()
print(json.dumps(sorted(opened)))
'''


@pytest.fixture(scope='module')
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A copy of the files git tracks: what a fresh clone holds, no build leftovers."""
    tree = tmp_path_factory.mktemp('clone')
    tracked = subprocess.run(['git', 'ls-files', '-z'], cwd=REPO, check=True,
                             capture_output=True).stdout.decode().split('\0')
    for name in filter(None, tracked):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    return tree


@pytest.fixture(scope='module')
def sdist(source_tree: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The tarball Beam's stager stages for the workers."""
    dist_dir = tmp_path_factory.mktemp('staging')
    return pathlib.Path(Stager._build_setup_package(  # pylint: disable=protected-access
        str(source_tree / 'setup.py'), str(dist_dir)))


def members(tarball: pathlib.Path) -> set[str]:
    """The files in the sdist, relative to its top directory."""
    with tarfile.open(tarball) as archive:
        return {name.split('/', 1)[1] for name in archive.getnames() if '/' in name}


def test_every_file_setup_py_reads_is_in_the_sdist(source_tree: pathlib.Path,
                                                   sdist: pathlib.Path):
    done = subprocess.run([sys.executable, '-c', _OPENED_FILES, str(source_tree)],
                          check=True, capture_output=True, text=True)
    opened = set(json.loads(done.stdout.splitlines()[-1]))
    assert 'requirements.txt' in opened  # the hook sees what setup.py reads
    assert opened <= members(sdist), sorted(opened - members(sdist))


def test_the_sdist_ships_the_cpp_op_sources(sdist: pathlib.Path):
    from trainer.ops import kernels
    assert {f'trainer/ops/{source.name}'
            for source in (*kernels.SOURCES, *kernels.HEADERS)} <= members(sdist)


def test_a_worker_installs_the_sdist_and_imports_trainer(sdist: pathlib.Path,
                                                         tmp_path: pathlib.Path):
    """A fresh environment that already holds the pinned stack, as the worker image
    does: the install resolves every pin offline and builds the tarball."""
    env_dir = tmp_path / 'worker'
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / 'bin' / 'python'
    purelib = subprocess.run(
        [str(python), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
        check=True, capture_output=True, text=True).stdout.strip()
    # The stack this test runs on stands in for the image's preinstalled packages.
    pathlib.Path(purelib, 'worker_image_stack.pth').write_text(
        sysconfig.get_paths()['purelib'] + '\n')
    install = subprocess.run(
        [str(python), '-m', 'pip', 'install', '--no-index', '--no-build-isolation',
         '--no-cache-dir', '--disable-pip-version-check', str(sdist)],
        capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    # Outside the source tree, so the import can only come from the install; one
    # module of each subpackage, since find_packages drops one without __init__.py.
    modules = ['trainer.features', 'trainer.pipeline.rating_parser', 'trainer.rating.optimizers',
               'trainer.topn.ials', 'trainer.serving.export', 'trainer.ops.kernels']
    done = subprocess.run(
        [str(python), '-c', 'import importlib, sys\n'
         'for name in sys.argv[1:]: print(importlib.import_module(name).__file__)', *modules],
        capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    files = done.stdout.split()
    assert len(files) == len(modules)
    assert all(file.startswith(str(env_dir)) for file in files), files
    installed = subprocess.run([str(python), '-m', 'pip', 'show', '--files',
                                'movielens-mf-trainer'],
                               capture_output=True, text=True, check=True).stdout
    assert 'Requires: ' in installed and 'tensorflow-transform' in installed
    assert 'trainer/ops/fused_epoch.cc' in installed


# What each part of the package may import (docs/model.md, "Code layout"): every
# import runs one way, so a subpackage can be read, and shipped, without the ones
# above it.
LAYERS = {
    'shared': {'shared', 'ops'},
    'ops': {'ops'},
    'pipeline': {'shared', 'pipeline'},
    'rating': {'shared', 'ops', 'rating'},
    'topn': {'shared', 'ops', 'rating', 'topn'},
    'serving': {'shared', 'ops', 'rating', 'topn', 'serving'},
}
ENTRY_POINTS = {'task', 'tune', 'summary'}


def _layer(module: str) -> str | None:
    """'trainer.rating.train' -> 'rating'; a top-level shared module -> 'shared'."""
    parts = module.split('.')
    if parts[0] != 'trainer' or len(parts) == 1:
        return None
    if parts[1] in LAYERS:
        return parts[1]
    return None if parts[1] in ENTRY_POINTS else 'shared'


def test_imports_run_one_way():
    import ast  # pylint: disable=import-outside-toplevel
    broken = []
    for path in sorted((REPO / 'trainer').rglob('*.py')):
        module = '.'.join(path.relative_to(REPO).with_suffix('').parts)
        layer = _layer(module)
        if layer is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [f'{node.module}.{alias.name}' for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                # `from trainer import features` names the module trainer.features.
                imported = _layer(target) if target.count('.') >= 1 else None
                if target.split('.')[:2] == ['trainer', 'ops'] or imported in LAYERS:
                    imported = _layer(target)
                if imported is not None and imported not in LAYERS[layer]:
                    broken.append(f'{module} imports {target}')
                if target.startswith('trainer.') and target.split('.')[1] in ENTRY_POINTS:
                    broken.append(f'{module} imports the entry point {target}')
    assert not broken, broken
