"""Experiments: typed configs, run directories named by config hash, resume, comparisons."""
from .config import ExperimentConfig, ConfigError
from .run import run_experiment, run_dir, load_run
from .compare import CompareSpec, reproduce_parser, run_compare, summarize
from .presets import PRESETS

__all__ = ["ExperimentConfig", "ConfigError", "run_experiment", "run_dir", "load_run",
           "CompareSpec", "reproduce_parser", "run_compare", "summarize", "PRESETS"]
