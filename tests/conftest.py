"""Shared fixtures."""
import warnings

import pytest


@pytest.fixture
def no_fx_warning():
    """Hugging Face models are not traceable by torch.fx: silence dormant's note that sites
    come from the recorded data flow instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dormant: torch.fx could not trace")
        yield
