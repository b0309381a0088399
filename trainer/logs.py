"""Logging set-up shared by every entry point (called once, in `main`)."""

from __future__ import annotations

import logging

# Libraries that narrate every step at INFO; their warnings still show.
_CHATTY = ('apache_beam', 'tensorflow', 'absl', 'urllib3', 'google', 'h5py')


def setup_logging(verbose: bool = False) -> None:
    """Logs INFO and up from this project, WARNING and up from libraries."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format='%(asctime)s %(levelname)s %(name)s: %(message)s', force=True)
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    try:
        from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
        absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.WARNING)
    except ImportError:
        pass
