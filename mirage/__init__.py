"""mirage: a standalone, pure-PyTorch reference implementation of the Mirage (PRX) text-to-image model.

This file holds what `sample.py` and `convert_weights.py` share before they import torch; the model's parts
are the package's modules (see the README's file guide)."""

import argparse
import os
import signal
import tempfile
from pathlib import Path


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with each error in one line, like the scripts' other errors: the usage block argparse prints
    first would push the message under a screenful of flags."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def use_huge_pages() -> None:
    """Have PyTorch ask Linux for 2 MB pages for its CPU tensors of 2 MB or more (THP_MEM_ALLOC_ENABLE=1, unless
    the environment already sets it), so that fresh memory costs 512x fewer page faults: reading a checkpoint into
    another dtype (bf16 weights run in fp32 on a CPU) is about twice as fast. PyTorch reads the setting once, at its
    first CPU allocation of 2 MB or more, so `sample.py` and `convert_weights.py` call this before importing it; in
    your own program, set the variable before `import torch`. It changes no result, only how memory is mapped."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def stop_on_signals() -> None:
    """End on SIGTERM (kill, timeout, docker stop) and SIGHUP as on Ctrl-C, so that the scripts' clean-up runs
    (no half-written checkpoint or image is left) and they say so in one line. A signal already ignored stays
    ignored: `nohup` runs a program with SIGHUP ignored so that it outlives its terminal."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name) and signal.getsignal(getattr(signal, name)) is not signal.SIG_IGN:
            signal.signal(getattr(signal, name), interrupt)


def check_writable(folder: Path, flag: str) -> None:
    """Fail now, not after minutes of reading or sampling, if `folder` cannot be made or written in (`flag` names
    the option that chose it); create nothing."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())  # the filesystem root exists
    if not existing.is_dir():
        raise NotADirectoryError(f"{existing} is a file, not a folder: choose another {flag}")
    try:
        tempfile.TemporaryFile(dir=existing).close()  # an unnamed file: nothing is left behind
    except OSError as err:
        raise PermissionError(f"cannot write in {existing} ({err.strerror}): choose another {flag}") from None
