"""Experiments: typed configs, run directories named by config hash, resume, comparisons."""
from .compare import CompareSpec, reproduce_parser, run_compare, summarize
from .config import ConfigError, ExperimentConfig
from .presets import PRESETS
from .run import load_run, run_dir, run_experiment

__all__ = ["ExperimentConfig", "ConfigError", "run_experiment", "run_dir", "load_run",
           "CompareSpec", "reproduce_parser", "run_compare", "summarize", "PRESETS"]
