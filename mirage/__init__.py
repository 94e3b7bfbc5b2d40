"""mirage: a standalone, pure-PyTorch reference implementation of the Mirage (PRX) text-to-image model."""
