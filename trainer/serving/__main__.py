"""`python -m trainer.serving`: the prediction server (`trainer.serving.server`)."""

import sys

from trainer import logs

logs.quiet_startup()  # before TensorFlow loads

from trainer.serving import server  # noqa: E402  pylint: disable=wrong-import-position

sys.exit(server.main())
