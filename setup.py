"""Packages `trainer` for Dataflow workers (--setup_file ./setup.py) and cloud training.

The runtime pins live once, in requirements.txt; this file reads them.
"""

import pathlib

import setuptools

HERE = pathlib.Path(__file__).resolve().parent


def read_requirements(name: str = 'requirements.txt') -> list[str]:
    lines = (HERE / name).read_text(encoding='utf-8').splitlines()
    return [line.split('#')[0].strip() for line in lines
            if line.split('#')[0].strip() and not line.startswith('-')]


setuptools.setup(
    name='movielens-mf-trainer',
    version='0.1.0',
    description='Biased matrix factorisation on MovieLens: Beam/TFT preprocessing and TF training.',
    packages=setuptools.find_packages(include=['trainer', 'trainer.*']),
    # The C++ ops' sources (trainer.ops.kernels.SOURCES): trainer/ops/kernels.py
    # builds them where it trains.
    package_data={'trainer.ops': ['*.cc', '*.h']},
    python_requires='>=3.11,<3.12',
    install_requires=read_requirements(),
)
