"""Keep TensorFlow's and onnxruntime's C++ log lines off the user's terminal.

TensorFlow writes lines such as "oneDNN custom operations are on" to the process's
stderr (file descriptor 2) from C++, which no Python-level setting silences
(TF_CPP_MIN_LOG_LEVEL=3 leaves some). The command-line tools promise one-line
errors, so they run their work with fd 2 pointed at a temporary file, which is
dropped; --debug leaves fd 2 alone, so those lines (and tracebacks) show.
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
