"""Dead-neuron scans of trained models, with the evidence stated.

    report = dormant.scan("path/to/hf-model", "tokens.npy")      # or a model and a tensor
    print(report)                        # per site: units, never active, bound, rare, sparsity
    report.save("scan/")                 # scan.json (with a removal plan), scan.html

A unit never active on N sequences fires on a sequence with probability below
``1 - (1 - confidence) ** (1 / N)`` (`compaction.firing_bound`); tokens of one sequence are
not independent, so N counts sequences, and the tokens are stated beside them. A rarely
active unit fires on fewer than `rare` of the tokens (with a 95% Wilson interval). Experts:
tokens routed to each, unrouted and dead experts. The JSON's ``plan`` lists the never-active
units per site: ``dormant.compact(model, plan=...)`` removes exactly those.

Models: a local Hugging Face directory (read with local files only: nothing is downloaded), a
``torch.save``d module (a pickle: only files you trust), or ``module:function`` returning
one. Data: token ids (``.npy``, ``.pt``, ``.jsonl`` of lists), or a text file tokenized with the
tokenizer saved in the model's directory; cut into sequences of `seq_len`.
"""
from __future__ import annotations

import html
import importlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from .compaction import PLAN_FORMAT, firing_bound, sequences_behind
from .monitor import ActivityMonitor
from .sites import _unwrap, find_sites

__all__ = ["ScanReport", "SiteScan", "load_model", "load_tokens", "scan", "PLAN_FORMAT"]

# firing-rate bins of the histogram: never, (0, 1e-4), [1e-4, 1e-3), ..., [0.1, 0.5), [0.5, 1]
RATE_BINS = ("0", "<1e-4", "<1e-3", "<1e-2", "<0.1", "<0.5", "≥0.5")


def _histogram(rate: torch.Tensor) -> list[int]:
    edges = torch.tensor([1e-4, 1e-3, 1e-2, 0.1, 0.5], dtype=rate.dtype)
    bins = torch.bucketize(rate.cpu(), edges, right=True) + 1
    bins[rate.cpu() == 0] = 0
    return torch.bincount(bins, minlength=len(RATE_BINS)).tolist()


@dataclass(frozen=True)
class SiteScan:
    site: str
    activation: str
    units: int
    dead: list[int]            # never-active units
    rare: list[int]            # active on fewer than `rare` of the tokens (not dead)
    tokens: int
    sequences: int
    bound: float               # firing probability per sequence of a never-active unit
    sparsity: float            # fraction of exact-zero outputs
    expert: str | None = None
    rare_rates: list = field(default_factory=list)   # [unit, rate, low, high] (95% Wilson)
    histogram: list = field(default_factory=list)    # units per firing-rate bin (RATE_BINS)


@dataclass
class ScanReport:
    model: str
    sites: list[SiteScan]
    sequences: int
    tokens: int
    confidence: float
    rare: float
    experts: list[dict] = field(default_factory=list)

    @property
    def dead(self) -> int:
        return sum(len(s.dead) for s in self.sites)

    def plan(self) -> dict:
        """The never-active units per site, for ``dormant.compact(model, plan=...)``."""
        return {"format": PLAN_FORMAT, "confidence": self.confidence,
                "sites": {s.site: s.dead for s in self.sites if s.dead},
                "evidence": {s.site: {"tokens": s.tokens, "sequences": s.sequences,
                                      "bound": s.bound} for s in self.sites if s.dead}}

    def to_dict(self) -> dict:
        return {"model": self.model, "sequences": self.sequences, "tokens": self.tokens,
                "confidence": self.confidence, "rare_below": self.rare, "dead": self.dead,
                "sites": [vars(s) for s in self.sites], "experts": self.experts,
                "plan": self.plan()}

    def __str__(self) -> str:
        head = ("site", "units", "never active", "bound", "rare", "sparsity %")
        rows = [head] + [(s.site, str(s.units), str(len(s.dead)),
                          f"{s.bound:.2%}" if s.dead else "", str(len(s.rare)),
                          f"{100 * s.sparsity:.1f}") for s in self.sites]
        w = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i])
                           for i, c in enumerate(r)) for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        text = (f"{self.model}: {self.sequences} sequences, {self.tokens} tokens; never active "
                f"= no firing on any token; bound = firing probability per sequence below it "
                f"at {self.confidence:.0%}; rare = active on < {self.rare:g} of tokens\n"
                + "\n".join(lines) + f"\nnever active: {self.dead} units")
        unrouted = [e["expert"] for e in self.experts if e["tokens"] == 0]
        dead = [e["expert"] for e in self.experts if e["dead"]]
        if self.experts:
            text += (f"\nexperts: {len(self.experts)}, unrouted (units unobserved, not dead): "
                     f"{', '.join(unrouted) or 'none'}; dead experts (routing share at most "
                     f"the threshold): {', '.join(dead) or 'none'}")
        return text

    def save(self, folder: str | os.PathLike) -> Path:
        """``scan.json`` and ``scan.html`` in `folder` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scan.json").write_text(json.dumps(self.to_dict(), indent=1))
        (folder / "scan.html").write_text(_html(self))
        return folder


# -- inputs -------------------------------------------------------------------------------------
def load_model(spec: str | os.PathLike, *, device: str = "cpu",
               dtype: torch.dtype | None = None) -> tuple[nn.Module, Path | None]:
    """(model in eval mode, its Hugging Face directory or None) from a local HF directory, a
    saved torch module, or ``module:function``."""
    text = str(spec)
    path = Path(text)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is not a model directory (no config.json); give a Hugging "
                             "Face model directory, a saved torch module or module:function")
        model = _hf_model(path)
        hf = path
    elif path.is_file():
        try:
            model = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ValueError(f"{path} cannot be loaded as a torch module ({type(err).__name__}: "
                             f"{str(err)[:160]})") from None
        if not isinstance(model, nn.Module):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a module (a state "
                             "dict needs its model: use module:function)")
        hf = None
    elif ":" in text and not path.exists():
        mod, _, fn = text.partition(":")
        try:
            model = getattr(importlib.import_module(mod), fn)()
        except (ImportError, AttributeError) as err:
            raise ValueError(f"{text}: cannot import the factory ({err})") from None
        hf = None
    else:
        raise FileNotFoundError(f"{text} does not exist (a model directory, a saved module, or "
                                "module:function)")
    model = model.to(device=device, **({"dtype": dtype} if dtype is not None else {}))
    return model.eval(), hf


def _hf_model(path: Path) -> nn.Module:
    import transformers as tf
    cfg = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    arch = (cfg.architectures or [None])[0]
    cls = getattr(tf, arch, None) if arch else None
    if cls is None:
        cls = tf.AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else tf.AutoModelForCausalLM
    return cls.from_pretrained(path, local_files_only=True)


def load_tokens(path: str | os.PathLike, *, seq_len: int, model_dir: Path | None = None,
                vocab: int | None = None, max_tokens: int | None = None) -> torch.Tensor:
    """(sequences, seq_len) token ids from a token file or a text file (tokenized with the
    model directory's tokenizer); the last partial sequence is dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".npy":         # memory-mapped: batches are read as the scan goes
        import numpy as np
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError:                  # an empty array cannot be mapped
            try:
                arr = np.load(path, allow_pickle=False)
            except ValueError as err:
                raise ValueError(f"{path} is not an array of token ids ({err})") from None
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{path} holds {arr.dtype} values, not integer token ids")
        arr = arr.reshape(-1)
        if max_tokens is not None:
            arr = arr[:max_tokens]
        return _checked(arr, len(arr), seq_len, path, vocab,
                        lambda: (int(arr.min()), int(arr.max())) if len(arr) else (0, 0))
    elif suffix == ".pt":
        ids = torch.load(path, map_location="cpu", weights_only=True)
        if not torch.is_tensor(ids):
            raise ValueError(f"{path} holds a {type(ids).__name__}, not a tensor of token ids")
        ids = ids.long()
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        ids = torch.tensor([t for r in rows for t in (r if isinstance(r, list) else r["ids"])])
    else:
        ids = _tokenize(path, model_dir)
    ids = ids.flatten()
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return _checked(ids, ids.numel(), seq_len, path, vocab,
                    lambda: (int(ids.min()), int(ids.max())) if ids.numel() else (0, 0))


def _checked(ids, count: int, seq_len: int, path: Path, vocab: int | None, bounds):
    """`ids` (a tensor or a memory-mapped array) as (sequences, seq_len), checked."""
    if count < seq_len:
        raise ValueError(f"{path} holds {count} tokens, fewer than one sequence of "
                         f"--seq-len {seq_len}")
    low, high = bounds()
    if vocab is not None and (high >= vocab or low < 0):
        raise ValueError(f"{path}: token ids must be in [0, {vocab}) (the model's vocabulary), "
                         f"got ids in [{low}, {high}]")
    n = count // seq_len
    return ids[:n * seq_len].reshape(n, seq_len)


def _tokenize(path: Path, model_dir: Path | None) -> torch.Tensor:
    if model_dir is None:
        raise ValueError(f"{path} is text: tokenizing it needs the tokenizer of a Hugging Face "
                         "model directory (or give token ids: .npy, .pt, .jsonl)")
    import transformers as tf
    files = [f.name for f in model_dir.iterdir()
             if f.name.startswith(("tokenizer", "vocab", "merges", "spiece"))
             or f.suffix == ".model"]
    if not files:
        raise ValueError(f"{model_dir} has no tokenizer to read {path} with (no tokenizer.json, "
                         "vocab or merges file): save one beside the model, or give token ids")
    try:
        tok = tf.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{model_dir} has no tokenizer to read {path} with ({str(err)[:120]}); "
                         "save one beside the model, or give token ids") from None
    return torch.tensor(tok(path.read_text(), add_special_tokens=False)["input_ids"])


# -- the scan -----------------------------------------------------------------------------------
@torch.no_grad()
def scan(model: nn.Module | str | os.PathLike, data: Any, *, seq_len: int = 128,
         batch_size: int = 8, max_tokens: int | None = None, device: str = "cpu",
         dtype: torch.dtype | None = None, rare: float = 1e-3, confidence: float = 0.95,
         expert_share: float = 0.0, progress: Callable[[str], None] | None = None
         ) -> ScanReport:
    """Scan `model` (a module, or what `load_model` reads) on `data` (a (sequences, seq_len)
    tensor of token ids, or a file `load_tokens` reads); an expert routed at most
    `expert_share` of its mixture's tokens is a dead expert. Memory: one batch plus the
    counters (a .npy file is memory-mapped)."""
    if not 0 < rare < 1 or not 0 < confidence < 1:
        raise ValueError(f"rare and confidence must be in (0, 1), got {rare}, {confidence}")
    name, hf = str(model), None
    if not isinstance(model, nn.Module):
        model, hf = load_model(model, device=device, dtype=dtype)
    else:
        name = type(_unwrap(model)).__name__
    model = _unwrap(model).eval()
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    ids = data if torch.is_tensor(data) else load_tokens(data, seq_len=seq_len, model_dir=hf,
                                                         vocab=vocab, max_tokens=max_tokens)
    if len(ids.shape) != 2 or ids.shape[0] == 0:
        raise ValueError(f"data: expected (sequences, tokens) ids, got shape {tuple(ids.shape)}")
    enc_dec = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    dev = next(model.parameters()).device

    def batch(rows) -> dict:               # a memory-mapped file: read here, one batch
        x = torch.as_tensor(rows if torch.is_tensor(rows) else rows.astype("int64"),
                            dtype=torch.long).to(dev)
        return {"input_ids": x, "decoder_input_ids": x} if enc_dec else {"input_ids": x}
    sites = find_sites(model, batch(ids[:2]))
    mon = ActivityMonitor(model, sites, mode="any")
    say = progress or (lambda line: None)
    t0, n = time.perf_counter(), ids.shape[0]
    with mon:
        for i in range(0, n, batch_size):
            model(**batch(ids[i:i + batch_size]))
            done = min(i + batch_size, n)
            if done == n or time.perf_counter() - t0 > 5 * (1 + i // (batch_size * 50)):
                say(f"[scan] {done}/{n} sequences ({done * ids.shape[1]} tokens), "
                    f"{time.perf_counter() - t0:.0f}s")
    stats, dead = mon.stats(), mon.dead_units("never_active")
    seqs = sequences_behind(stats, sites, n)
    rows = []
    for s in sites:
        st = stats[s.name]
        rate = st.active.double() / max(st.positions, 1)
        never = dead[s.name].cpu()
        rare_units = ((rate < rare) & ~never.to(rate.device)).cpu()
        rare_idx = rare_units.nonzero().flatten().tolist()
        active = st.active.cpu()
        rates = [[u, float(rate[u]), *wilson(int(active[u]), st.positions)] for u in rare_idx]
        rows.append(SiteScan(s.name, s.activation, s.num_units,
                             never.nonzero().flatten().tolist(), rare_idx, st.positions,
                             seqs[s.name], firing_bound(seqs[s.name], confidence),
                             float(st.zeros.sum()) / max(st.positions * s.num_units, 1),
                             s.expert, rates, _histogram(rate)))
    experts = _experts(mon, expert_share)
    return ScanReport(name, rows, n, n * int(ids.shape[1]), confidence, rare, experts)


def _experts(mon: ActivityMonitor, expert_share: float) -> list[dict]:
    from .diagnose import expert_rows
    return [{"expert": e.expert, "mixture": e.mixture, "tokens": e.tokens, "share": e.share,
             "dead": e.dead} for e in expert_rows(mon, expert_share)]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a rate k / n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def _html(r: ScanReport) -> str:
    """A self-contained page: the table, dead % by site as bars (CSS), expert load."""
    e = html.escape
    rows = "".join(
        f"<tr><td>{e(s.site)}</td><td>{s.units}</td><td>{len(s.dead)}</td>"
        f"<td>{'' if not s.dead else f'{s.bound:.2%}'}</td><td>{len(s.rare)}</td>"
        f"<td>{100 * s.sparsity:.1f}</td><td><div class='bar' style='width:"
        f"{100 * len(s.dead) / max(s.units, 1):.1f}%'></div></td></tr>" for s in r.sites)
    hist_head = "".join(f"<th>{e(b)}</th>" for b in RATE_BINS)
    hist = "".join(f"<tr><td>{e(s.site)}</td>" + "".join(
        f"<td style='background:rgba(192,57,43,{c / max(s.units, 1):.3f})'>{c}</td>"
        for c in s.histogram) + "</tr>" for s in r.sites)
    experts = "".join(f"<tr><td>{e(x['expert'])}</td><td>{x['tokens']}</td>"
                      f"<td>{100 * x['share']:.1f}</td></tr>" for x in r.experts)
    expert_table = (f"<h2>Experts</h2><table><tr><th>expert</th><th>tokens</th>"
                    f"<th>share %</th></tr>{experts}</table>" if r.experts else "")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>dormant scan</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:right}}td:first-child{{text-align:left}}
.bar{{background:#c0392b;height:10px}}td:last-child{{width:200px}}</style></head><body>
<h1>Dead-neuron scan: {e(r.model)}</h1>
<p>{r.sequences} sequences, {r.tokens} tokens. Never active: no firing on any token; bound: a
never-active unit fires on a sequence with probability below it at {r.confidence:.0%}; rare:
active on fewer than {r.rare:g} of the tokens. Never active in all: {r.dead} units.</p>
<table><tr><th>site</th><th>units</th><th>never active</th><th>bound</th><th>rare</th>
<th>sparsity %</th><th>dead %</th></tr>{rows}</table>
<h2>Units by firing rate (share of tokens)</h2><table><tr><th>site</th>{hist_head}</tr>{hist}
</table>{expert_table}</body></html>
"""

