"""Tests of trainer/topn/catalog.py: titles in every layout, and the ragged train items."""

from __future__ import annotations

import os

import numpy as np
import pytest

from trainer import features
from trainer.topn import catalog

AMELIE = "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)"
TITLE_FILES = {
    'ml-100k': (f'1|{AMELIE}|01-Jan-2001||http://x|0|1\n'
                '02|Toy Story (1995)|01-Jan-1995||http://y|0|0\n'),
    'ml-1m': f'1::{AMELIE}::Comedy|Romance\n2::Toy Story (1995)::Animation\n',
    'ml-25m': ('movieId,title,genres\n'
               f'1,"{AMELIE}",Comedy|Romance\n'
               '2,"""Great Performances"" Cats (1998)",Musical\n'
               '3,"City of Lost Children, The (1995)",Drama\n'),
}


@pytest.mark.parametrize('layout_name', sorted(TITLE_FILES))
def test_read_titles_decodes_each_layout(layout_name, work_dir):
    layout = features.DATASETS[layout_name]
    os.makedirs(features.raw_dir(work_dir))
    path = os.path.join(features.raw_dir(work_dir), layout.movies_file)
    with open(path, 'wb') as f:
        f.write(TITLE_FILES[layout_name].encode(layout.movies_encoding))
    titles = catalog.read_titles(work_dir, layout)
    assert titles['1'] == AMELIE  # latin-1 (ml-100k, ml-1m) and utf-8 alike
    assert '02' not in titles  # ids are normalised as the ratings parser does
    if layout_name == 'ml-25m':
        assert titles['3'] == 'City of Lost Children, The (1995)'
        assert titles['2'] == '"Great Performances" Cats (1998)'
    else:
        assert titles['2'] == 'Toy Story (1995)'


def test_read_titles_without_a_staged_file_is_empty(work_dir):
    assert catalog.read_titles(work_dir, features.ML_100K) == {}


def test_group_by_user_sorts_items_and_leaves_oov_rows_empty():
    values, splits = catalog.group_by_user(
        np.array([2, 0, 2, 0, 2]), np.array([5, 3, 1, 0, 4]), num_rows=4)
    np.testing.assert_array_equal(values, [0, 3, 1, 4, 5])
    np.testing.assert_array_equal(splits, [0, 2, 2, 5, 5])
    assert values.dtype == np.int32 and splits.dtype == np.int64
    with pytest.raises(ValueError, match=r'\[0, 4\)'):
        catalog.group_by_user(np.array([4]), np.array([0]), num_rows=4)


def test_build_catalog_falls_back_to_the_id_and_counts_ratings():
    built = catalog.build_catalog(
        ['10', '20', '30'], {'10': AMELIE, '30': 'Heat (1995)'}, num_users=2,
        train_users=np.array([0, 1, 1]), train_items=np.array([2, 2, 0]))
    assert list(built.titles) == [AMELIE, '20', 'Heat (1995)']
    np.testing.assert_array_equal(built.item_counts, [1, 0, 2])
    assert built.num_items == 3 and built.num_users == 2
    assert built.seen().to_list() == [[2], [0, 2], []]  # the last row is OOV
