"""dormant: find, revive and remove dead (dormant) neurons in PyTorch networks."""
from .criteria import CRITERIA, SiteStats, register_criterion
from .diagnose import Diagnosis, diagnose, probe
from .masks import Masks
from .monitor import ActivityMonitor
from .registry import Registry, UnknownNameError
from .sites import NoSitesError, Site, Tap, find_sites, format_sites, make_site, register_activation

__version__ = "0.1.0"

__all__ = [
    "ActivityMonitor", "CRITERIA", "Diagnosis", "Masks", "NoSitesError", "Registry", "Site",
    "SiteStats", "Tap", "UnknownNameError", "diagnose", "find_sites", "format_sites",
    "make_site", "probe",
    "register_activation", "register_criterion", "__version__",
]


_LAZY = ("methods", "batching", "options", "train", "experiments", "report")
_LAZY_NAMES = {"compact": "compaction", "save_compacted": "compaction", "load_compacted": "compaction",
               "sparse_inference": "sparse", "scan": "scanning"}


def __getattr__(name: str):
    """``dormant.methods`` and the other upper layers load on first use, so that importing
    ``dormant`` (or ``dormant.report``) does not import the methods or the training loop."""
    if name in _LAZY:
        import importlib
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY_NAMES:      # speed tools: dormant.compact(...), dormant.sparse_inference(...)
        import importlib
        return getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    raise AttributeError(f"module 'dormant' has no attribute {name!r}")
