"""Eq. 33 (adaptive LR) and gradient clipping on the gradients DeepSpeed hands the torch optimizer.

Under ZeRO-1/2 no rank ever holds a full gradient: after the reduce-scatter each rank owns one
contiguous slice ("partition") of a flat fp32 buffer that concatenates every parameter of the
optimizer's param group, and DeepSpeed calls the torch optimizer's ``step()`` with
``param_groups[g]["params"] == [flat_partition_g]`` and ``flat_partition_g.grad`` set (already
averaged over ranks and loss-scale-unscaled). An adder layer's weight may be split over two ranks
(e.g. 35 elements: 30 on rank 0, 5 on rank 1), so its ``||grad F_l||_2`` needs every rank's piece.

This module runs as a ``register_step_pre_hook`` on that torch optimizer, i.e. after DeepSpeed's
reduction and before SGD's weight decay / momentum (which keep torch SGD semantics):

1. per adder layer ``l``: the squared norm of this rank's piece of ``grad F_l``; plus the squared
   norm of everything else (needed for clipping) -> a vector of L+1 fp32 values;
2. ONE ``all_reduce(SUM)`` of that vector over the data-parallel group (L+1 floats per step, not
   a gather of gradients); under ZeRO-0 gradients are replicated and nothing is communicated;
3. scale each local piece by ``alpha_l = eta * sqrt(k_l) / ||grad F_l||_2``;
4. clip: total norm AFTER the eq. 33 scaling (the DDP engine's order: scale, then clip), computed
   from the reduced vector as ``sqrt(sum_l (alpha_l n_l)^2 + other^2)``, then every local gradient
   is multiplied by ``min(1, max_norm / (total + 1e-6))`` (torch ``clip_grad_norm_``'s formula).

The norms use the DDP engine's reductions wherever a rank holds the whole tensor (``grad_norms`` per
piece; at ZeRO-0 also torch's ``get_total_norm`` for clipping), so ZeRO-0 steps exactly as DDP does, bit
for bit: under bf16 autocast a last-bit difference in alpha_l flipped bf16 roundings of the stem and
classifier and grew to 5e-4 in the loss by step 5 (issue 21.8, tests/integration/test_engine_bf16_agreement.py).
Under ZeRO-1/2 a layer split over two ranks still sums two pieces' squares (last-bit differences remain).

Where the pieces are: DeepSpeed links every model parameter to its slice of the flat partition
(``param._hp_mapping``, ``None`` on ranks that own no piece of it); ``hp_fragment_address.start`` is
the offset inside the partition and ``.numel`` the length. That link exists for ZeRO-1/2 and for
DeepSpeed's BF16 optimizer; under ZeRO-0 (fp32 or torch autocast) the torch optimizer steps the
model parameters themselves, whose ``.grad`` is the full, all-reduced gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from addernet_dist.adaptive_lr import grad_norms

# Maps the (L,) global adder grad norms to the (L,) eq. 33 factors alpha_l.
AlphaFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class _Segment:
    layer: int  # index into the adder weight list
    start: int  # offset in the flat tensor the optimizer steps
    numel: int


class ShardedGradProcessor:
    """Adaptive LR (eq. 33) + clipping applied to sharded or replicated gradients, in place.

    Args:
        adder_weights: the ``weight`` of every adder layer, in ``adder_modules`` order (L of them).
        alpha_fn: (L,) global grad norms -> (L,) factors; ``None`` disables eq. 33 scaling.
        max_norm: clip the total gradient norm (after scaling) to this; ``None`` disables it.

    After each optimizer step, ``last_norms`` (L,), ``last_alphas`` (L,) and ``last_total_norm``
    (scalar, before clipping) hold what was measured, as tensors (no host sync). Without clipping
    the total norm is measured only for a step with ``want_total_norm`` set (the trainer's log
    steps): the non-adder squared sum is one more pass over the gradients.
    """

    def __init__(
        self,
        adder_weights: Sequence[nn.Parameter],
        *,
        alpha_fn: AlphaFn | None,
        max_norm: float | None,
    ) -> None:
        self.adder_weights = list(adder_weights)
        self.alpha_fn = alpha_fn
        self.max_norm = max_norm
        self.last_norms: torch.Tensor | None = None
        self.last_alphas: torch.Tensor | None = None
        self.last_total_norm: torch.Tensor | None = None
        self.want_total_norm = False  # set per step by the engine (log steps)
        self._segments: dict[int, list[_Segment]] = {}  # id(stepped tensor) -> adder pieces in it
        self._group: dist.ProcessGroup | None = None
        self._sharded = False
        self._handle = None
        # (device, layer of each piece) -> that index on the device, built once: a torch.tensor(...,
        # device=cuda) per step would be a host-to-device copy (and a sync point) every step.
        self._layer_index: tuple[tuple, torch.Tensor] | None = None
        # ZeRO-1/2 steps each param group on its own (``_optimizer_step(i)``: param_groups = [group i],
        # only group i's gradient partition exists). The ids of the flat partitions of the groups
        # that hold adder weights (the same groups on every rank, so the hook's all-reduce matches);
        # None: every call is processed (one group, or an optimizer that steps all groups at once).
        self._adder_flats: set[int] | None = None

    @property
    def active(self) -> bool:
        return self.alpha_fn is not None or self.max_norm is not None

    def attach(self, torch_optimizer: torch.optim.Optimizer, ds_optimizer: object) -> None:
        """Learn where every adder weight's gradient lives and hook ``torch_optimizer.step``.

        Call after ``deepspeed.initialize``: ``torch_optimizer`` is the engine's
        ``basic_optimizer`` (the torch SGD), ``ds_optimizer`` the engine's ``optimizer`` (a ZeRO /
        BF16 wrapper, or the torch optimizer itself under ZeRO-0 fp32).
        """
        stepped = {id(p): p for g in torch_optimizer.param_groups for p in g["params"]}
        if all(id(w) in stepped for w in self.adder_weights):
            # ZeRO-0: the torch optimizer steps the model parameters; .grad is full and identical
            # on every rank after DeepSpeed's all-reduce, so norms are local and exact.
            self._sharded = False
            self._segments = {
                id(w): [_Segment(layer=i, start=0, numel=w.numel())]
                for i, w in enumerate(self.adder_weights)
            }
        else:
            self._attach_sharded(torch_optimizer, ds_optimizer)
        # Always hooked: a log step may want the total norm even with eq. 33 and clipping off.
        self._handle = torch_optimizer.register_step_pre_hook(self._pre_step)

    def _attach_sharded(self, torch_optimizer: torch.optim.Optimizer, ds_optimizer: object) -> None:
        groups = torch_optimizer.param_groups
        if any(len(g["params"]) != 1 for g in groups):
            raise NotImplementedError(
                "the DeepSpeed engine's adaptive LR / clipping under ZeRO-1/2 expects one flat "
                "partition per param group (DeepSpeed's ZeRO-1/2 layout); got "
                f"{[len(g['params']) for g in groups]} tensors per group"
            )
        missing = [i for i, w in enumerate(self.adder_weights) if not hasattr(w, "_hp_mapping")]
        if missing:
            raise RuntimeError(
                f"adder weights {missing} are not linked to DeepSpeed's fp32 partition "
                "(no _hp_mapping): this ZeRO stage / precision combination is not supported; "
                "use zero_stage 0, 1 or 2"
            )
        # One flat partition per param group (AdamW has two: decay / no decay, optim.py); the offset
        # of a fragment is into its own group's partition.
        flats = [g["params"][0] for g in groups]
        self._segments = {id(f): [] for f in flats}
        model_groups = getattr(ds_optimizer, "bit16_groups", None)
        if len(flats) > 1 and model_groups is not None and len(model_groups) == len(flats):
            adder_ids = {id(w) for w in self.adder_weights}
            self._adder_flats = {
                id(flats[i]) for i, g in enumerate(model_groups) if any(id(p) in adder_ids for p in g)
            }
        for i, w in enumerate(self.adder_weights):
            mapping = w._hp_mapping
            if mapping is None:  # this rank owns no piece of layer i
                continue
            addr = mapping.get_hp_fragment_address()
            frag = mapping.get_hp_fragment()
            # The offset must point into one of THESE tensors: a different layout (another DeepSpeed
            # version) would silently scale the wrong elements, so fail loudly instead.
            owner = [
                f
                for f in flats
                if frag.data_ptr() == f.data_ptr() + addr.start * f.element_size() and frag.numel() == addr.numel
            ]
            if len(owner) != 1:
                raise RuntimeError(
                    f"DeepSpeed's fp32 fragment of adder layer {i} does not lie in a flat "
                    "partition the optimizer steps; unsupported DeepSpeed layout"
                )
            self._segments[id(owner[0])].append(_Segment(layer=i, start=addr.start, numel=addr.numel))
        self._sharded = True
        self._group = getattr(ds_optimizer, "real_dp_process_group", [None])[0]

    def _index_on(self, dev: torch.device, layers: list[int]) -> torch.Tensor:
        key = (dev, tuple(layers))
        if self._layer_index is None or self._layer_index[0] != key:
            self._layer_index = (key, torch.tensor(layers, device=dev))
        return self._layer_index[1]

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    # -- the hook --------------------------------------------------------------------------------
    @torch.no_grad()
    def _pre_step(self, optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        if self._adder_flats is not None and not any(
            id(p) in self._adder_flats for g in optimizer.param_groups for p in g["params"]
        ):
            return  # ZeRO stepping a group without adder weights (e.g. AdamW's no-decay group)
        need_total = self.max_norm is not None or self.want_total_norm
        if not self.active and not need_total:
            return  # nothing to scale, clip or measure this step (and no collective)
        grads: list[torch.Tensor] = []  # every gradient the optimizer is about to use
        pieces: list[tuple[_Segment, torch.Tensor]] = []  # adder gradient views inside them
        covered: dict[int, list[_Segment]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                grads.append(g)
                segs = self._segments.get(id(p), [])
                if segs:
                    covered[id(g)] = segs
                flat = g.view(-1)
                for s in segs:
                    pieces.append((s, flat.narrow(0, s.start, s.numel)))
        if not grads:
            return
        dev = grads[0].device
        num_layers = len(self.adder_weights)
        sq = torch.zeros(num_layers + 1, dtype=torch.float32, device=dev)
        if pieces:
            # The DDP engine's reduction (adaptive_lr.grad_norms), squared: a layer held whole by one
            # rank (every layer at ZeRO-0) gets its norm back bit for bit (sqrt(fl(n^2)) == n in binary
            # floating point while n^2 is normal: n > 1e-19, far below the 1e-12 floor of eq. 33).
            piece_sq = grad_norms([v for _, v in pieces]).float().square()
            sq.index_add_(0, self._index_on(dev, [s.layer for s, _ in pieces]), piece_sq)
        if need_total and self._sharded:
            sq[-1] = self._other_sq(grads, covered)
        if self._sharded and dist.is_initialized():
            # The one collective per step: L+1 floats.
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self._group)
        norms = sq[:-1].sqrt()
        self.last_norms = norms

        scaled_sq = sq[:-1]
        if self.alpha_fn is not None:
            alphas = self.alpha_fn(norms).to(torch.float32)
            self.last_alphas = alphas
            for s, v in pieces:
                v.mul_(alphas[s.layer].to(v.dtype))
            scaled_sq = (alphas * norms).square()
        if need_total:
            if self._sharded:
                self.last_total_norm = (scaled_sq.sum() + sq[-1]).sqrt()
            else:
                # ZeRO-0: full replicated gradients, so the DDP engine's clip_grad_norm_ /
                # get_total_norm reduction itself (the formula above differs from it in the last bit;
                # see adaptive_lr.grad_norms).
                self.last_total_norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if self.max_norm is not None:
            total = self.last_total_norm
            coef = torch.clamp(self.max_norm / (total + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coef)

    @staticmethod
    def _other_sq(grads: list[torch.Tensor], covered: dict[int, list[_Segment]]) -> torch.Tensor:
        """Squared norm of every gradient element that is not an adder weight's."""
        total = torch.zeros((), dtype=torch.float32, device=grads[0].device)
        for g in grads:
            segs = sorted(covered.get(id(g), []), key=lambda s: s.start)
            flat = g.view(-1)
            pos = 0
            for s in segs:
                if s.start > pos:
                    total += flat[pos : s.start].float().square().sum()
                pos = s.start + s.numel
            if pos < flat.numel():
                total += flat[pos:].float().square().sum()
        return total
