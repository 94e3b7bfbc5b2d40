"""Session fixtures: tiny random PRX checkpoints in diffusers layout, and their conversions."""

import pytest

import convert_weights
from tiny_checkpoint import save_tiny_prx


@pytest.fixture(scope="session")
def prx_root(tmp_path_factory):
    return tmp_path_factory.mktemp("prx")


@pytest.fixture(scope="session")
def prx_flux(prx_root):
    """A tiny random PRX checkpoint with a Flux-style VAE, as diffusers saves it."""
    folder = prx_root / "prx-flux"
    save_tiny_prx(folder, "flux")
    return folder


@pytest.fixture(scope="session")
def prx_dcae(prx_root):
    """A tiny random PRX checkpoint with a DC-AE, as diffusers saves it (beside prx_flux)."""
    folder = prx_root / "prx-dcae"
    save_tiny_prx(folder, "dc-ae")
    return folder


@pytest.fixture(scope="session")
def mirage_flux(tmp_path_factory, prx_flux):
    out = tmp_path_factory.mktemp("mirage") / "flux"
    convert_weights.main([str(prx_flux), str(out)])
    return out


@pytest.fixture(scope="session")
def mirage_dcae(tmp_path_factory, prx_dcae):
    out = tmp_path_factory.mktemp("mirage") / "dcae"
    convert_weights.main([str(prx_dcae), str(out)])
    return out
