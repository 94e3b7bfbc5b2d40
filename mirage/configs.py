"""Frozen configurations of every Mirage component, with one preset per published variant.

Each dataclass checks its invariants where it is made, so an impossible configuration fails with a
clear ValueError before any weight is allocated.
"""

from dataclasses import dataclass, field, replace

# ---- transformer ----------------------------------------------------------------------------


# ---- text encoder ---------------------------------------------------------------------------


# ---- tokenizer ------------------------------------------------------------------------------


# ---- Flux VAE -------------------------------------------------------------------------------


# ---- DC-AE ----------------------------------------------------------------------------------


# ---- checkpoint (all components together) ---------------------------------------------------
