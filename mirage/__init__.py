"""mirage: a standalone, pure-PyTorch reference implementation of the Mirage (PRX) text-to-image model."""

import os
import signal


def use_huge_pages() -> None:
    """Have PyTorch ask Linux for 2 MB pages for its CPU tensors of 2 MB or more (THP_MEM_ALLOC_ENABLE=1, unless
    the environment already sets it), so that fresh memory costs 512x fewer page faults: reading a checkpoint into
    another dtype (bf16 weights run in fp32 on a CPU) is about twice as fast. PyTorch reads the setting once, at its
    first CPU allocation of 2 MB or more, so `sample.py` and `convert_weights.py` call this before importing it; in
    your own program, set the variable before `import torch`. It changes no result, only how memory is mapped."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def stop_on_signals() -> None:
    """End on SIGTERM (kill, timeout, docker stop) and SIGHUP as on Ctrl-C, so that the scripts' clean-up runs
    (no half-written checkpoint or image is left) and they say so in one line."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), interrupt)
