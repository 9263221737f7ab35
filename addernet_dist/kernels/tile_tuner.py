"""Tile selection for the Triton adder kernels: tuned once per layer shape, the same on every rank.

Why not ``triton.autotune``: (1) its key contained the batch size, so evaluation batches and a short
last batch re-tuned every layer (5–8 configs × 2–6 s of ptxas each); (2) each rank timed on its own,
and the tile changes result bits (the EXP2_FMA split, the BN-partials merge order, ∂F's atomic order),
so ranks could disagree in the last bits of BN statistics and weights. ``TileTuner``:

* keys on the layer shape only — channels, spatial sizes, filter, stride/padding/dilation, code path
  and dtype, **not the batch size** N: the batch only changes the number of programs (M = N·P·Q), and at
  ResNet sizes every per-GPU batch ≥ 16 already fills the GPU many times over, so the tile that wins
  for one batch is the tile for the others (docs/kernels.md, "Tuning");
* under ``torch.distributed`` with world size > 1, rank 0 times the configs and broadcasts its choice
  (``broadcast_object_list``); the other ranks compile only the chosen tile. Every rank meets the
  same layer shapes in the same order in training (DDP already requires that), so the collective
  lines up; a tile cache (below) removes even that collective;
* reads a **tile cache** (JSON) named by ``ADDERNET_TILE_CACHE``, written by ``addernet-warmup`` before
  the run: a key found there is never timed and never broadcast, so a run started from a warm cache
  has no tuning at all and every rank uses the file's tiles;
* tuning is a phase of the stall watchdog (``set_phase_hooks``): timing 5–8 tiles × 2–6 s of ptxas per
  key keeps rank 0 busy for minutes while the other ranks wait in the broadcast, which the training
  limit (``train.stall_timeout_s=300``) would take for a stall. Rank 0 reports progress after every
  trial; a failure on rank 0 is broadcast and raised on every rank as that error (``TileTuningError``),
  instead of leaving the others in the broadcast until the watchdog fires;
* its choices are part of the training checkpoint (``choices()`` / ``restore_choices``, plain ints
  and strings): after a restart rank 0 could time other winners, and the tile changes result bits.

The timing function is ``TileTuner.bench`` (module-level ``bench``), replaceable in tests to make two
ranks prefer different tiles.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import triton

CACHE_ENV = "ADDERNET_TILE_CACHE"
CACHE_VERSION = 1
# ADDERNET_TILE_TUNING=0: no timing; every uncached key takes the first tile of its (pruned) list, the
# same on every rank (addernet-selftest's correctness checks use this to skip minutes of ptxas).
TUNING_ENABLED = os.environ.get("ADDERNET_TILE_TUNING", "1") != "0"

# key string → {"BLOCK_M": .., ..., "num_warps": .., "num_stages": ..}; shared by every tuner (the key
# starts with the tuner's kind).
_choices: dict[str, dict[str, Any]] = {}
_loaded_path: str | None = None


class TileTuningError(RuntimeError):
    """Tuning failed on rank 0 (raised there and, with rank 0's message, on every other rank)."""


# The stall watchdog's hooks (guard.StallWatchdog.during / .progress; the trainer installs them):
# ``phase(name)`` wraps every tuning (rank 0's timing and the other ranks' wait for its choice),
# ``progress()`` is called by rank 0 after each timed tile.
_phase: Callable[[str], AbstractContextManager] = lambda name: nullcontext()  # noqa: E731
_progress: Callable[[], None] = lambda: None  # noqa: E731


def set_phase_hooks(
    phase: Callable[[str], AbstractContextManager] | None, progress: Callable[[], None] | None
) -> None:
    """Install (or with None, remove) the watchdog hooks tuning reports to."""
    global _phase, _progress
    _phase = phase or (lambda name: nullcontext())
    _progress = progress or (lambda: None)


def config_dict(cfg: triton.Config) -> dict[str, Any]:
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def _same(cfg: triton.Config, d: dict[str, Any]) -> bool:
    return config_dict(cfg) == d


def bench(run: Callable[[], None]) -> float:
    """Seconds per launch of ``run``: CUDA events via triton's do_bench on a GPU, wall clock otherwise
    (the interpreter; tuning there is only exercised by tests)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        from triton.testing import do_bench

        return do_bench(run, warmup=5, rep=25) * 1e-3
    run()
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def _world() -> tuple[int, int]:
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def _broadcast_from_rank0(value: Any) -> Any:
    obj = [value]
    torch.distributed.broadcast_object_list(obj, src=0)
    return obj[0]


class TileTuner:
    """Chooses one config of ``configs`` per layer-shape key for ``kernel`` (see the module docstring).

    ``key``: names of the kernel's arguments / constexprs that select the tile (never the batch size).
    ``prune(configs, named_args, **consts)``: drops configs that would time duplicates for this call.
    """

    def __init__(
        self,
        kind: str,
        kernel,
        configs: list[triton.Config],
        key: Iterable[str],
        prune: Callable | None = None,
    ):
        self.kind = kind
        self.kernel = kernel
        self.configs = list(configs)
        self.key = tuple(key)
        if "N" in self.key:
            raise ValueError(
                "the tile key must not contain the batch size N (it would re-tune per batch)"
            )
        self.prune = prune
        self.arg_names = list(inspect.signature(kernel.fn).parameters)
        self.bench: Callable[[Callable[[], None]], float] = bench
        self.tunings = 0  # how many keys this process timed (tests count re-tunes)

    def key_of(self, args: tuple, consts: dict[str, Any]) -> str:
        named = dict(zip(self.arg_names, args))
        named.update(consts)
        missing = [k for k in self.key if k not in named]
        if missing:
            raise KeyError(
                f"tile key names {missing} are not arguments of {self.kernel.fn.__name__}"
            )
        parts = [self.kind, str(getattr(args[0], "dtype", "")).replace("torch.", "")]
        parts += [f"{k}={_plain(named[k])}" for k in self.key]
        return "|".join(parts)

    def candidates(self, args: tuple, consts: dict[str, Any]) -> list[triton.Config]:
        if self.prune is None:
            return list(self.configs)
        return self.prune(self.configs, dict(zip(self.arg_names, args)), **consts)

    def choose(
        self,
        args: tuple,
        consts: dict[str, Any],
        run: Callable[[triton.Config], None],
        reset: Iterable[torch.Tensor] = (),
    ) -> triton.Config:
        """The config for this call's key; times the candidates (rank 0) on first sight of the key.

        ``run(cfg)`` launches the kernel with ``cfg``; ``reset`` tensors are zeroed before every trial
        (atomic accumulation targets) and once more afterwards, so the caller's real launch starts clean.
        """
        _maybe_load_env_cache()
        key = self.key_of(args, consts)
        hit = _choices.get(key)
        if hit is not None:
            for cfg in self.configs:
                if _same(cfg, hit):
                    return cfg
            warnings.warn(
                f"tile cache entry {key} = {hit} is not one of the current tiles; re-tuning it "
                "(re-run addernet-warmup after upgrading)",
                RuntimeWarning,
                stacklevel=2,
            )
        cands = self.candidates(args, consts)
        if not TUNING_ENABLED:
            return cands[0]
        rank, world = _world()
        with _phase("tuning"):
            idx, error = self._time_on_rank0(cands, run, list(reset), rank, world)
        if error is not None:
            if rank == 0 or world == 1:
                raise error
            raise TileTuningError(f"rank 0 failed to tune the tiles of {key}: {error}")
        cfg = cands[idx]
        _choices[key] = config_dict(cfg)
        return cfg

    def _time_on_rank0(self, cands, run, reset, rank: int, world: int):
        """(index of rank 0's choice, None) or (None, rank 0's exception), the same on every rank."""
        idx, error = None, None
        if rank == 0 or world == 1:
            try:
                idx = self._time(cands, run, reset)
            except Exception as e:
                error = e
        if world > 1:
            # The tile changes result bits: every rank must launch rank 0's choice. A failure is
            # sent too (its message), so the other ranks raise it instead of waiting for a tile.
            sent = _broadcast_from_rank0(
                idx if error is None else f"{type(error).__name__}: {error}"
            )
            if rank != 0:
                idx, error = (sent, None) if isinstance(sent, int) else (None, sent)
        return idx, error

    def _time(self, cands, run, reset) -> int:
        self.tunings += 1
        times = []
        for cfg in cands:

            def trial(cfg=cfg):
                for t in reset:
                    t.zero_()
                run(cfg)

            try:
                times.append(self.bench(trial))
            except Exception as e:  # e.g. out of shared memory/registers on this GPU: skip the tile
                warnings.warn(
                    f"{self.kind} tile {config_dict(cfg)} failed: {e}", RuntimeWarning, stacklevel=3
                )
                times.append(float("inf"))
            _progress()  # a trial done: rank 0 is alive and tuning (the watchdog's clock)
        for t in reset:
            t.zero_()
        best = min(range(len(cands)), key=lambda i: times[i])
        if times[best] == float("inf"):
            raise TileTuningError(f"no {self.kind} tile config could run")
        return best


def _plain(v: Any) -> Any:
    return v if isinstance(v, (int, float, bool, str)) else str(v)


# ---- the tile cache file ------------------------------------------------------------------------------
def _maybe_load_env_cache() -> None:
    path = os.environ.get(CACHE_ENV)
    if path and path != _loaded_path:
        load_tile_cache(path)


def load_tile_cache(path: str) -> int:
    """Merge the choices of a tile cache file into this process; returns how many entries it had.

    A missing file is an error naming the fix (a typo in ``ADDERNET_TILE_CACHE`` would otherwise make
    every rank tune silently)."""
    global _loaded_path
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{CACHE_ENV}={path!r} does not exist; create it with `addernet-warmup --config <cfg> "
            f"--tile-cache {path}` or unset {CACHE_ENV}"
        )
    with open(path) as f:
        data = json.load(f)
    if data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        raise ValueError(
            f"{path} is not an addernet tile cache (version {CACHE_VERSION}); re-run addernet-warmup"
        )
    dev = data.get("device")
    here = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if dev and dev != here:
        warnings.warn(
            f"tile cache {path} was tuned on {dev!r}, this is {here!r}: its tiles are used as they are "
            "(results are consistent across ranks; speed may not be optimal)",
            RuntimeWarning,
            stacklevel=2,
        )
    _merge(_checked_entries(data["entries"], path), path)
    _loaded_path = path
    return len(data["entries"])


def _checked_entries(entries: Any, where: str) -> dict[str, dict[str, int | str]]:
    """``entries`` if it is a tile map (key string → {name: int or str}); a clear error otherwise."""
    ok = isinstance(entries, dict) and all(
        isinstance(k, str)
        and isinstance(v, dict)
        and all(isinstance(n, str) and isinstance(x, (int, str)) for n, x in v.items())
        for k, v in entries.items()
    )
    if not ok:
        raise ValueError(
            f"{where}: the tile choices are not a map of key strings to {{name: int}} tiles; "
            "re-run addernet-warmup (a tile cache) or resume from another checkpoint"
        )
    return entries


def _merge(entries: dict[str, dict[str, Any]], source: str) -> None:
    """Add ``entries``; a key this process already has keeps its tile (a run resumed from a
    checkpoint keeps the tiles its first part ran with, whatever a newer tile cache says)."""
    differ = [k for k, v in entries.items() if k in _choices and _choices[k] != v]
    if differ:
        warnings.warn(
            f"{source}: {len(differ)} tile choices differ from the ones this run already uses "
            f"(e.g. {differ[0]}); keeping the run's (its results depend on them)",
            RuntimeWarning,
            stacklevel=3,
        )
    for k, v in entries.items():
        _choices.setdefault(k, dict(v))


def restore_choices(entries: Any, source: str = "checkpoint") -> int:
    """Take the tile choices a checkpoint saved (``choices()``); returns how many. They replace any
    choice of this process (e.g. from ``ADDERNET_TILE_CACHE``): the run's bits so far came from them."""
    for k, v in _checked_entries(entries, source).items():
        _choices[k] = dict(v)
    return len(entries)


def save_tile_cache(path: str) -> int:
    """Write every choice this process knows (tuned or loaded) to ``path`` atomically; returns the count."""
    data = {
        "version": CACHE_VERSION,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "triton": triton.__version__,
        "entries": dict(sorted(_choices.items())),
    }
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tile_cache.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)
    return len(data["entries"])


def choices() -> dict[str, dict[str, Any]]:
    """A copy of the current key → tile map (plain strings and ints: a checkpoint holds it)."""
    return {k: dict(v) for k, v in _choices.items()}


def clear() -> None:
    """Forget every choice (tests)."""
    global _loaded_path
    _choices.clear()
    _loaded_path = None
