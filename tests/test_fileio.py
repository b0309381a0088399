"""trainer.fileio: the same behaviour on local disk and on GCS (the emulator),
and the light scripts start without importing TensorFlow."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from trainer import fileio

REPO = pathlib.Path(__file__).resolve().parents[1]


def _exercise(root: str) -> None:
    """Every function of fileio under root, checked as it goes."""
    directory = root + '/dir/sub'
    fileio.makedirs(directory)
    assert fileio.isdir(directory)
    path = directory + '/notes.txt'
    assert not fileio.exists(path)
    fileio.write_text(path, 'caf\u00e9,1\n')
    assert fileio.exists(path) and not fileio.exists(path + '.tmp')
    with fileio.open_file(path) as f:
        assert f.read() == 'caf\u00e9,1\n'
    assert fileio.size(path) == len('caf\u00e9,1\n'.encode())
    fileio.write_text(path, 'replaced\n')  # replaces, as a re-run does
    with fileio.open_file(path) as f:
        assert f.read() == 'replaced\n'
    with fileio.open_file(directory + '/data.bin', 'wb') as f:
        f.write(b'\x00\x01')
    fileio.replace(directory + '/data.bin', directory + '/moved.bin')
    assert sorted(name.rstrip('/') for name in fileio.listdir(directory)) == [
        'moved.bin', 'notes.txt']
    fileio.remove(directory + '/moved.bin')
    assert not fileio.exists(directory + '/moved.bin')
    fileio.rmtree(root + '/dir')
    assert not fileio.exists(path)


def test_local_paths(tmp_path):
    _exercise(str(tmp_path))
    assert fileio.is_local(str(tmp_path)) and not fileio.is_local('gs://bucket/x')


def test_gcs_paths(gcs):
    _exercise(gcs.url('fileio-check'))


@pytest.mark.parametrize('code', [
    'import runpy, sys; sys.argv = ["plot.py", "--help"]\n'
    'try:\n    runpy.run_path("plot.py", run_name="__main__")\nexcept SystemExit:\n    pass',
    'import trainer.summary, trainer.history, trainer.features, trainer.fileio',
    'import runpy, sys; sys.argv = ["data-extractor.py", "--help"]\n'
    'try:\n    runpy.run_path("data-extractor.py", run_name="__main__")\nexcept SystemExit:\n'
    '    pass',
])
def test_light_entry_points_do_not_import_tensorflow(code):
    # Importing TensorFlow takes about 4 s; plot.py, the run summary and the
    # extractor of local data do not need it.
    check = code + '\nassert "tensorflow" not in sys.modules, "tensorflow was imported"'
    subprocess.run([sys.executable, '-c', 'import sys\n' + check], cwd=REPO, check=True,
                   capture_output=True)


def test_plot_and_summary_of_a_finished_run_do_not_import_tensorflow(tmp_path):
    model_dir = tmp_path / 'model'
    model_dir.mkdir()
    (model_dir / 'loss_log.csv').write_text(
        'epoch,train_mse,train_rmse,train_mae,validation_mse,validation_rmse,'
        'validation_mae,eval_mse,eval_rmse,eval_mae,seconds\n'
        '1,1.0,1.0,0.8,1.1,1.05,0.85,1.2,1.1,0.9,0.5\n'
        '2,0.8,0.9,0.7,1.0,1.0,0.8,1.1,1.05,0.85,0.5\n')
    code = ('import runpy, sys\n'
            f'sys.argv = ["plot.py", "--model-dir", {str(model_dir)!r}, '
            f'"--out", {str(tmp_path / "fig" / "loss.png")!r}]\n'
            'try:\n    runpy.run_path("plot.py", run_name="__main__")\n'
            'except SystemExit as exit_:\n    assert not exit_.code, exit_.code\n'
            'assert "tensorflow" not in sys.modules, "tensorflow was imported"\n')
    subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True, capture_output=True)
    assert (tmp_path / 'fig' / 'loss.png').stat().st_size > 0


@pytest.mark.parametrize('content, usable', [
    ({'type': 'authorized_user', 'refresh_token': 'r'}, True),
    ({'type': 'service_account', 'private_key': 'k'}, True),
    ({'type': 'impersonated_service_account', 'source_credentials': {}}, False),
    ({'type': 'external_account', 'audience': 'a'}, False),
])
def test_credentials_tensorflow_can_use_are_told_apart(tmp_path, content: dict, usable: bool):
    key = tmp_path / 'adc.json'
    key.write_text(json.dumps(content))
    problem = fileio.gcs_credentials_problem({'GOOGLE_APPLICATION_CREDENTIALS': str(key)})
    assert (problem is None) == usable
    if not usable:
        assert content['type'] in problem and len(problem.splitlines()) == 1


def test_without_a_credentials_file_the_metadata_server_is_left_to_tensorflow(tmp_path):
    assert fileio.gcs_credentials_problem({'HOME': str(tmp_path)}) is None
    config = tmp_path / 'config'
    config.mkdir()
    (config / 'application_default_credentials.json').write_text('{"type": "external_account"}')
    assert 'external_account' in fileio.gcs_credentials_problem({'CLOUDSDK_CONFIG': str(config)})
