"""Keep TensorFlow's and onnxruntime's C++ log lines off the user's terminal.

TensorFlow writes lines such as "oneDNN custom operations are on" to the process's
stderr (file descriptor 2) from C++, which no Python-level setting silences
(TF_CPP_MIN_LOG_LEVEL=3 leaves some). The command-line tools promise one-line
errors, so they run their work with fd 2 pointed at a temporary file and replay it
only when asked (--debug).
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def captured_native_stderr(enabled: bool = True) -> Iterator[None]:
    """Redirect fd 2 into a temporary file for the duration of the block."""
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


CLI_NAMES = frozenset({"bn-fold", "bn-export-onnx", "bn-export-litert", "bn-recalibrate"})


def running_as_cli() -> bool:
    """True when this process is one of the package's console scripts, without --debug.

    The console scripts import this package (and so TensorFlow) before their main()
    runs; this is how the package's __init__ knows to keep the import quiet.
    """
    return os.path.basename(sys.argv[0] or "") in CLI_NAMES and "--debug" not in sys.argv
