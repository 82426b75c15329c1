"""torchrun as the stages run it (`python -m stages.pipeline.torchrun ARGS`, torchrun's arguments): stopped by
SIGTERM or Ctrl-C, it stops its processes in order as torchrun does, then exits with the signal's exit code
quietly, where torchrun prints a traceback and a warning per process; its other messages are kept to errors
(LOGLEVEL, unless set; torchrun's own notes, such as the OMP_NUM_THREADS banner, are warnings)."""

import logging
import os
import sys

os.environ.setdefault("LOGLEVEL", "ERROR")  # read by torch's elastic loggers as they are made, on import

from torch.distributed.elastic.multiprocessing.api import SignalException  # noqa: E402
from torch.distributed.run import main  # noqa: E402

if __name__ == "__main__":
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        main()
    except SignalException as e:
        sys.exit(128 + e.sigval)
