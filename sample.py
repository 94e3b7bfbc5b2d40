"""Generate images from a prompt with a converted Mirage checkpoint (not implemented yet)."""

import sys

if __name__ == "__main__":
    sys.exit("sample.py: text-to-image sampling is not implemented yet (tracked in issue 5).")
