"""The loss log: one row of metrics per epoch, as a CSV next to the model.

`EpochMetrics` is a row; `features.LOSS_LOG_COLUMNS` names its fields in
order.  The whole file is rewritten after every epoch through a temp file and
a rename (object stores cannot append), so a reader never sees a half-written
row; a resumed run keeps the rows up to its checkpoint's epoch.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging

from trainer import features
from trainer import fileio

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EpochMetrics:
    """One loss-log row; fields are features.LOSS_LOG_COLUMNS.

    train_*: the running error of the epoch's batches, each measured before
    its update (NaN for a row that describes a model without training it);
    validation_* and eval_*: the whole slice or split, after the epoch.  All
    of predictions clipped to the rating scale; validation_* are NaN without
    a validation slice.  `seconds` is the epoch's training time alone.
    """
    epoch: int
    train_mse: float
    train_rmse: float
    train_mae: float
    validation_mse: float
    validation_rmse: float
    validation_mae: float
    eval_mse: float
    eval_rmse: float
    eval_mae: float
    seconds: float


class ResumeError(ValueError):
    """The model dir holds a run this one cannot continue; the message says why."""


def read_loss_log(path: str) -> tuple[EpochMetrics, ...]:
    """Rows of an existing loss log; () if there is none.

    Raises:
      ResumeError: if the header is not LOSS_LOG_COLUMNS or a row is short.
    """
    if not fileio.exists(path):
        return ()
    with fileio.open_file(path) as f:
        reader = csv.reader(f)
        header = tuple(next(reader, ()))
        if header != features.LOSS_LOG_COLUMNS:
            raise ResumeError(
                f'{path} is not a loss log: columns {header!r}, expected '
                f'{features.LOSS_LOG_COLUMNS!r}; re-run the trainer with --overwrite')
        rows = [row for row in reader if row]
    if any(len(row) != len(header) for row in rows):
        raise ResumeError(f'{path} has rows without {len(header)} columns (cut off?); '
                          're-run the trainer with --overwrite')
    return tuple(EpochMetrics(int(row[0]), *map(float, row[1:])) for row in rows)


def write_loss_log(path: str, history: tuple[EpochMetrics, ...]) -> None:
    """Rewrites the whole CSV (object stores cannot append), via a temp file."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow(features.LOSS_LOG_COLUMNS)
    writer.writerows(dataclasses.astuple(row) for row in history)
    fileio.write_text(path, text.getvalue())


def keep_restored_rows(path: str, epoch: int) -> tuple[EpochMetrics, ...]:
    """Loss-log rows up to the restored epoch; later rows are dropped (logged)."""
    history = read_loss_log(path)
    kept = tuple(row for row in history if row.epoch <= epoch)
    if len(kept) < len(history):
        logger.warning('Dropping %d loss-log rows after restored epoch %d',
                       len(history) - len(kept), epoch)
    if [row.epoch for row in kept] != list(range(1, epoch + 1)):
        logger.warning('Loss log %s lacks rows for some of epochs 1..%d',
                       path, epoch)
    return kept
