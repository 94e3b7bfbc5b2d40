"""Convert published Mirage/PRX checkpoints into mirage's layout (not implemented yet)."""

import sys

if __name__ == "__main__":
    sys.exit("convert_weights.py: checkpoint conversion is not implemented yet (tracked in issue 5).")
