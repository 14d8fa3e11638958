"""Local training of a CPS pair of STU-Nets on one site's preprocessed volumes.

Each iteration draws a labeled batch (masked volumes: GED4, or any labeled phase for ATLAS
pretraining) and, in "cps" mode, an unlabeled batch (unlabeled GED4 and other phases, each volume
its own single-channel sample). Both nets see both batches in one forward pass each (instance norm
is per sample, so concatenating is exact) and are updated from

    sup(a) + sup(b) + lambda(t) * [cross(a <- argmax b) + cross(b <- argmax a)] (+ FedProx terms)

with nnU-Net's optimiser (SGD Nesterov 0.99, weight decay 3e-5, poly lr, gradient norm 12).
`t` is the global iteration (`start_iteration` onwards), so the lambda ramp-up and the learning
rate continue across federated rounds. "supervised" mode drops the unlabeled batch and the cross
term (ablation); both nets are still trained so callers see the same interface.

On CUDA the forward passes and losses run under fp16 autocast with a GradScaler, as nnU-Net trains
(`autocast`); on the CPU everything stays float32 unless told otherwise (bf16, for checks).
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from client.data_loading import (AugmentationParams, Batch, BatchBuilder, Prefetcher, augmentation_params,
                                 build_training_transforms, deep_supervision_scales)
from client.losses import CrossPseudoLoss, cps_lambda, poly_lr, proximal_term, supervised_loss
from client.label_transfer import strong_view_transforms
from common.device import AUTOCAST_CHOICES, autocast_dtype
from common.label_transfer_config import DEFAULT_LABEL_TRANSFER, LabelTransferConfig
from common.names import BRANCHES, CONFIGURATION
from common.phases import LABELED_PHASE
from common.pretrained import load_initial_weights
from common.run_config import default, parse_mirror_axes

MODES = ("cps", "supervised")

LogFn = Callable[[str], None]


@dataclass
class TrainerConfig:
    mode: str = "cps"                          # "cps" | "supervised"
    batch_size: int = 2                        # labeled samples per iteration
    unlabeled_batch_size: int | None = None    # unlabeled samples per iteration (None: batch_size)
    patch_size: tuple[int, int, int] | None = None   # (z, y, x); None: the plans' patch
    learning_rate: float = 0.01                # lr0 of the poly schedule
    momentum: float = 0.99
    weight_decay: float = 3e-5
    grad_clip: float = 12.0
    lambda_max: float = 1.0                    # CPS weight after ramp-up
    rampup_iterations: int = 0                 # global iterations of the exp(-5(1-t/T)^2) ramp-up
    rampup: int | None = None                  # alias of rampup_iterations (architecture.md's name)
    cps_loss: str = "ce"                       # "ce" | "dice_ce"
    cps_on_labeled: bool = False               # also apply the cross term to the labeled batch
    cps_confidence: float = 0.0                # cross term only where the teacher's softmax exceeds this (0: all)
    cps_gate: float = 0.0                      # cross term off until validation Dice reaches this (0: no gate)
    cps_gate_every: int = 25                   # iterations between validation checks while the gate is closed
    cps_strong_view: bool = False              # students see unlabeled samples through `strong_view_transforms`,
                                               # teachers (no gradient) as nnU-Net augmented them; the cross
                                               # term then covers unlabeled samples only (cps_on_labeled aside)
    balance_phases: bool = True                # batches draw a phase uniformly, then a volume of it
    labeled_share: float = 0.5                 # share of labeled draws on the truly labeled phases
                                               # when propagated phases are labeled too (balance_phases)
    labeled_phases: tuple[str, ...] = (LABELED_PHASE,)  # the truly labeled phases (the site's masks); any
                                               # other phase among the labeled volumes is propagated
    label_transfer: LabelTransferConfig = DEFAULT_LABEL_TRANSFER
    mirror_axes: tuple[int, ...] = field(default_factory=lambda: parse_mirror_axes(default("mirror-axes")))
                                               # patch axes nnU-Net's augmentation mirrors (nnU-Net: all three)
    encoder_lr_scale: float = 1.0              # the encoder's learning rate relative to the rest (what a
                                               # domain-randomised start knows lives there; 0: frozen)
    proximal_mu: float = 0.0                   # FedProx mu (0: off)
    oversample_foreground: float = 0.33        # nnU-Net: this fraction of labeled samples centred on liver
    augment: bool = True                       # nnU-Net's training transforms
    seed: int = 0                              # net a: seed, net b: seed + 1, data: derived from seed
    prefetch: int = 2                          # batches prepared in a background thread (0: inline)
    log_every: int = 10                        # progress line every N iterations (0: only the last)
    pretrained: str | None = None              # initial weights: checkpoint file (a pair: one net a branch) or MODEL_DIR
    device: str = "cpu"                        # a torch device; callers resolve `auto` (common.device)
    autocast: str = "auto"                     # "auto": fp16 + GradScaler on CUDA, float32 on CPU; "off" | "fp16" | "bf16"
    channels_last_convs: bool | None = None    # faster 3x3x3 convs on CPU (None: on when device is CPU)

    def __post_init__(self) -> None:
        if self.rampup is not None:
            self.rampup_iterations = int(self.rampup)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.autocast not in AUTOCAST_CHOICES:
            raise ValueError(f"autocast must be one of {AUTOCAST_CHOICES}, got {self.autocast!r}")
        if self.cps_loss not in ("ce", "dice_ce"):
            raise ValueError(f"cps_loss must be 'ce' or 'dice_ce', got {self.cps_loss!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.patch_size is not None:
            self.patch_size = tuple(int(p) for p in self.patch_size)
        self.mirror_axes = tuple(int(a) for a in self.mirror_axes)
        if isinstance(self.label_transfer, Mapping):
            self.label_transfer = LabelTransferConfig(**self.label_transfer)


@dataclass
class TrainStats:
    """Means over the iterations of one `train` call (losses are per iteration, before weighting
    by lambda for `cps`; `total` is what was minimised)."""
    mode: str
    iterations: int
    start_iteration: int
    total_iterations: int
    sup_a: float
    sup_b: float
    cps: float
    total: float
    seconds_per_iteration: float
    data_wait_per_iteration: float             # time the nets waited for a batch
    peak_memory_mib: float                     # peak RSS of the process (resource.getrusage)
    num_labeled: int
    num_unlabeled: int
    lambda_last: float
    lr_last: float
    history: list[float] = field(default_factory=list, repr=False)   # total loss per iteration
    peak_gpu_memory_mib: float = 0.0           # torch.cuda.max_memory_allocated during the call (0 on CPU)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("history")
        return out


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build_net(plans: dict, seed: int) -> nn.Module:
    """A deep-supervision STU-Net from the plans, initialised from `seed` without touching global RNG."""
    from common.stunet import build_stunet_from_plans

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_stunet_from_plans(plans, num_classes=2, deep_supervision=True)


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last_3d),) + tuple(args[1:])


def _to_contiguous(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.contiguous()


def use_channels_last_convs(net: nn.Module) -> nn.Module:
    """Run the net's 3x3x3 convs in channels-last-3d layout, everything else in the default one.

    On CPU, oneDNN's 3D convs with few channels (STU-Net "T": 8-128) are 2-3x faster forward and
    backward in channels-last, while instance norm and the rest are slower there; converting around
    each conv wins overall (measured here: one net, batch 4, 32x64x64, 1.6 -> 1.1 s per fwd+bwd).
    Same results up to float rounding; parameter names and values are unchanged.
    """
    for module in net.modules():
        if isinstance(module, nn.Conv3d) and module.kernel_size == (3, 3, 3):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
            module.register_forward_pre_hook(_to_channels_last)
            module.register_forward_hook(_to_contiguous)
    return net


def _parameter_groups(net: nn.Module, encoder_lr_scale: float) -> list[dict]:
    """One group (every parameter) or, with a scaled encoder, the encoder (`conv_blocks_context`) apart."""
    if encoder_lr_scale == 1.0:
        return [{"params": list(net.parameters())}]
    encoder = [p for n, p in net.named_parameters() if n.startswith("conv_blocks_context.")]
    rest = [p for n, p in net.named_parameters() if not n.startswith("conv_blocks_context.")]
    return [{"params": encoder, "lr_scale": float(encoder_lr_scale)}, {"params": rest, "lr_scale": 1.0}]


class CPSTrainer:
    """Two STU-Nets ("a", "b") trained with cross pseudo supervision; see the module docstring."""

    def __init__(self, plans: dict, labeled: Sequence, unlabeled: Sequence, config: TrainerConfig | None = None,
                 *, validation: Sequence = (), log: LogFn | None = None, synthesis: Mapping[str, Sequence] | None = None):
        """`synthesis`: {phase: transforms} that turn each labeled crop of that phase into an image before
        nnU-Net's pipeline (domain-randomised pretraining: crops of tissue label maps, `simulations.synthesis`)."""
        self.plans = plans
        self.config = config = config or TrainerConfig()
        self.log = log or print
        self.device = torch.device(config.device)
        self.labeled = list(labeled)
        self.unlabeled = list(unlabeled) if config.mode == "cps" else []
        if not self.labeled and not self.unlabeled:
            raise ValueError("CPSTrainer: no training volumes (supervised mode needs labeled ones)")

        self.nets: dict[str, nn.Module] = {b: _build_net(plans, config.seed + i).to(self.device)
                                          for i, b in enumerate(BRANCHES)}
        if config.pretrained:
            for branch, net in self.nets.items():
                summary = load_initial_weights(net, config.pretrained, branch)
            self.log(f"initial weights: {summary}")
        channels_last = config.channels_last_convs
        if channels_last or (channels_last is None and self.device.type == "cpu"):
            for net in self.nets.values():
                use_channels_last_convs(net)
        # Mixed precision as nnU-Net trains: forward and loss under autocast, and on float16 a
        # GradScaler (one for both nets: one loss, two optimisers, as PyTorch's AMP recipe does it).
        self.amp_dtype = autocast_dtype(config.autocast, self.device)
        self.grad_scaler = (torch.amp.GradScaler(self.device.type)
                            if self.amp_dtype == torch.float16 and self.device.type == "cuda" else None)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # nnU-Net's setting: fixed patch shapes, fastest 3D conv kernels
        self.optimizers = {b: torch.optim.SGD(_parameter_groups(net, config.encoder_lr_scale), lr=config.learning_rate,
                                              momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True)
                           for b, net in self.nets.items()}

        conf = plans["configurations"][CONFIGURATION]
        patch = config.patch_size or tuple(int(p) for p in conf["patch_size"])
        net = self.nets[BRANCHES[0]]  # both branches are the same architecture
        if any(p % d for p, d in zip(patch, net.divisor)):
            raise ValueError(f"patch {patch} (z, y, x) is not divisible by the network's {net.divisor}")
        self.params: AugmentationParams = augmentation_params(patch, config.mirror_axes)
        strides = [[1, 1, 1]] + [list(s) for s in net.strides]
        self.ds_scales = deep_supervision_scales(strides, num_outputs=5)
        batch_dice = bool(conf.get("batch_dice", False))
        self.sup_loss = supervised_loss(len(self.ds_scales), batch_dice)
        self.cross_loss = CrossPseudoLoss(config.cps_loss, len(self.ds_scales), batch_dice, config.cps_confidence)
        # The cross term waits while this is False: the gate on validation Dice, checked here on
        # `validation` volumes (pooled training) or opened by the caller (the federation's server).
        self.validation = list(validation)
        self.cross_term_enabled = not (config.cps_gate > 0 and self.validation)

        seeds = np.random.SeedSequence(config.seed).spawn(2)
        self._labeled_builder = self._unlabeled_builder = None
        if self.labeled:
            self._labeled_builder = BatchBuilder(
                self.labeled, config.batch_size, self.params,
                build_training_transforms(self.params, self.ds_scales, config.label_transfer, labeled=True),
                labeled=True, seed=int(seeds[0].generate_state(1)[0]), balance_phases=config.balance_phases,
                phase_weights=self._labeled_phase_weights(),
                oversample_foreground=config.oversample_foreground, augment=config.augment,
                transforms_by_phase={phase: build_training_transforms(self.params, self.ds_scales, config.label_transfer,
                                                                      labeled=True, synthesis=extra)
                                     for phase, extra in (synthesis or {}).items()})
        if self.unlabeled:
            # Same pipeline; the all-zero segmentation is dropped, so no deep-supervision downsampling.
            self._unlabeled_builder = BatchBuilder(
                self.unlabeled, config.unlabeled_batch_size or config.batch_size, self.params,
                build_training_transforms(self.params, None, config.label_transfer, labeled=False), labeled=False,
                seed=int(seeds[1].generate_state(1)[0]), augment=config.augment, balance_phases=config.balance_phases,
                strong_view=strong_view_transforms() if config.cps_strong_view and config.mode == "cps" else None)

    def _labeled_phase_weights(self) -> dict[str, float] | None:
        """The truly labeled phases (`labeled_phases`) drawn with `labeled_share` between them, the
        propagated phases sharing the rest equally: the true labels keep their weight however many
        other phases a case has. One labeled phase (GED4): share * others / (1 - share), as before."""
        phases = {v.phase for v in self.labeled}
        labeled = phases & set(self.config.labeled_phases)
        others = phases - labeled
        if not labeled or not others:
            return None
        share = min(max(self.config.labeled_share, 0.0), 1.0)
        weight = share * len(others) / max(1.0 - share, 1e-9) / len(labeled)
        return {**{p: weight for p in labeled}, **{p: 1.0 for p in others}}

    # ----------------------------------------------------------------------------------------- weights
    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """{"a": ..., "b": ...}: contiguous CPU copies, safe to keep while training goes on."""
        return {b: {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                    for k, v in net.state_dict().items()}
                for b, net in self.nets.items()}

    def load_state_dicts(self, branches: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Load both branches (strict). Optimiser momentum is kept, as in a continuing nnU-Net run."""
        missing = [b for b in BRANCHES if b not in branches]
        if missing:
            raise KeyError(f"load_state_dicts: missing branch(es) {missing}")
        for b, net in self.nets.items():
            net.load_state_dict({k: torch.as_tensor(v) for k, v in branches[b].items()}, strict=True)

    def momentum_buffers(self) -> dict[str, np.ndarray]:
        """SGD momentum of both nets as {"a.<param>": array}, for a site that keeps it between rounds.

        With nnU-Net's momentum 0.99 a fresh optimiser needs ~100 steps to reach full speed; a
        federated round of a few dozen local steps would otherwise run at a fraction of it.
        """
        out: dict[str, np.ndarray] = {}
        for b, net in self.nets.items():
            state = self.optimizers[b].state
            for name, param in net.named_parameters():
                buffer = state.get(param, {}).get("momentum_buffer")
                if buffer is not None:
                    out[f"{b}.{name}"] = buffer.detach().to("cpu").contiguous().numpy().copy()
        return out

    def load_momentum_buffers(self, buffers: Mapping[str, np.ndarray]) -> int:
        """Restore what `momentum_buffers` returned; entries whose name or shape no longer match are
        left at zero (a changed model starts its momentum afresh). Returns how many were loaded."""
        loaded = 0
        for b, net in self.nets.items():
            state = self.optimizers[b].state
            for name, param in net.named_parameters():
                value = buffers.get(f"{b}.{name}")
                if value is None or tuple(value.shape) != tuple(param.shape):
                    continue
                buffer = torch.empty_like(param)  # keeps the param's memory format (channels-last convs)
                buffer.copy_(torch.as_tensor(value))
                state[param]["momentum_buffer"] = buffer
                loaded += 1
        return loaded

    # ----------------------------------------------------------------------------------------- training
    def _next_batches(self) -> tuple[Batch | None, Batch | None]:
        lb = self._labeled_builder.next_batch() if self._labeled_builder is not None else None
        ub = self._unlabeled_builder.next_batch() if self._unlabeled_builder is not None else None
        return lb, ub

    def _step(self, lb: Batch | None, ub: Batch | None, lam: float, lr: float,
              reference: Mapping[str, Mapping[str, torch.Tensor]] | None) -> dict[str, float]:
        cfg = self.config
        # With a strong view the nets learn from it; the teachers' labels come from the weak one.
        strong = ub is not None and ub.strong is not None and cfg.mode == "cps" and lam > 0
        parts = [b.data for b in (lb, ub) if b is not None]
        if strong:
            parts[-1] = ub.strong
        x = torch.cat(parts).to(self.device, non_blocking=True) if len(parts) > 1 else parts[0].to(self.device)
        n_lab = lb.data.shape[0] if lb is not None else 0
        # float32 path (CPU default): no autocast context at all, so its numbers stay exactly as before.
        amp = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with amp:
            outputs = {b: net(x) for b, net in self.nets.items()}

            zero = x.new_zeros(())
            sup = {b: zero for b in BRANCHES}
            if lb is not None:
                target = [t.to(self.device, non_blocking=True) for t in lb.target]
                sup = {b: self.sup_loss([o[:n_lab] for o in outputs[b]], target) for b in BRANCHES}
            cps = zero
            if strong:
                with torch.no_grad():
                    weak = ub.data.to(self.device, non_blocking=True)
                    teacher_a, teacher_b = (self.nets[b](weak) for b in BRANCHES)
                out_a, out_b = ([o[n_lab:] for o in outputs[b]] for b in BRANCHES)
                cps = self.cross_loss(out_a, teacher_b) + self.cross_loss(out_b, teacher_a)
            elif cfg.mode == "cps" and lam > 0:
                start = 0 if cfg.cps_on_labeled else n_lab
                if start < x.shape[0]:
                    out_a, out_b = ([o[start:] for o in outputs[b]] for b in BRANCHES)
                    cps = self.cross_loss(out_a, out_b) + self.cross_loss(out_b, out_a)
            total = sum(sup.values()) + lam * cps
        if cfg.proximal_mu > 0 and reference is not None:
            total = total + sum(proximal_term(self.nets[b], reference[b], cfg.proximal_mu) for b in BRANCHES)

        for b in BRANCHES:
            for group in self.optimizers[b].param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            self.optimizers[b].zero_grad(set_to_none=True)
        scaler = self.grad_scaler
        if scaler is None:
            total.backward()
        else:
            scaler.scale(total).backward()
        for b in BRANCHES:
            if scaler is not None:
                scaler.unscale_(self.optimizers[b])  # clip the true gradients
            torch.nn.utils.clip_grad_norm_(self.nets[b].parameters(), cfg.grad_clip)
            if scaler is None:
                self.optimizers[b].step()
            else:
                scaler.step(self.optimizers[b])  # skipped when the scaled gradients overflowed
        if scaler is not None:
            scaler.update()
        return {**{f"sup_{b}": float(sup[b].detach()) for b in BRANCHES},
                "cps": float(cps.detach()), "total": float(total.detach())}

    def train(self, iterations: int, *, start_iteration: int = 0, total_iterations: int | None = None,
              reference: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
              log: LogFn | None = None) -> TrainStats:
        """Run `iterations` steps at global iterations start_iteration .. start_iteration + iterations - 1.

        total_iterations: the poly schedule's horizon (default: start_iteration + iterations).
        reference: FedProx anchor {"a": state dict, "b": state dict} (the global weights of this
        round); with proximal_mu > 0 and no reference, the weights at the start of this call.
        """
        cfg = self.config
        log = log or self.log
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        total_iterations = total_iterations or start_iteration + iterations
        if cfg.proximal_mu > 0 and reference is None:
            reference = self.state_dicts()
        if reference is not None and cfg.proximal_mu > 0:
            reference = {b: {k: torch.as_tensor(v).to(self.device) for k, v in reference[b].items()}
                         for b in BRANCHES}
        for net in self.nets.values():
            net.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

        sums: dict[str, float] = defaultdict(float)
        history: list[float] = []
        lam = lr = 0.0
        wait = 0.0
        started = time.perf_counter()
        # Exactly `iterations` batches are produced, so the data stream does not depend on timing.
        with Prefetcher(self._next_batches, depth=cfg.prefetch, limit=iterations) as batches:
            for i in range(iterations):
                t = start_iteration + i
                if not self.cross_term_enabled and self.validation and i % max(1, cfg.cps_gate_every) == 0:
                    self._check_gate(t, log)
                lam = 0.0
                if cfg.mode == "cps" and self.cross_term_enabled:
                    lam = cps_lambda(t, cfg.lambda_max, cfg.rampup_iterations)
                lr = poly_lr(cfg.learning_rate, t, total_iterations)
                waited = time.perf_counter()
                lb, ub = batches.get()
                wait += time.perf_counter() - waited
                losses = self._step(lb, ub, lam, lr, reference)
                if not math.isfinite(losses["total"]):
                    raise FloatingPointError(f"loss is {losses['total']} at iteration {t}")
                for k, v in losses.items():
                    sums[k] += v
                history.append(losses["total"])
                done = i + 1
                if done == iterations or (cfg.log_every > 0 and done % cfg.log_every == 0):
                    elapsed = time.perf_counter() - started
                    log(f"it {done}/{iterations} (global {t + 1}/{total_iterations}) | "
                        f"sup_a {sums['sup_a'] / done:.4f} sup_b {sums['sup_b'] / done:.4f} "
                        f"cps {sums['cps'] / done:.4f} total {sums['total'] / done:.4f} | "
                        f"lambda {lam:.3f} lr {lr:.2e} | {elapsed / done:.2f} s/it "
                        f"(data wait {wait / done:.2f}) | peak {peak_rss_mib():.0f} MiB"
                        + (f", GPU {self.peak_gpu_memory_mib():.0f} MiB" if self.device.type == "cuda" else ""))
        elapsed = time.perf_counter() - started
        return TrainStats(
            mode=cfg.mode, iterations=iterations, start_iteration=start_iteration,
            total_iterations=total_iterations,
            sup_a=sums["sup_a"] / iterations, sup_b=sums["sup_b"] / iterations, cps=sums["cps"] / iterations,
            total=sums["total"] / iterations, seconds_per_iteration=elapsed / iterations,
            data_wait_per_iteration=wait / iterations, peak_memory_mib=peak_rss_mib(),
            num_labeled=len(self.labeled), num_unlabeled=len(self.unlabeled),
            lambda_last=lam, lr_last=lr, history=history, peak_gpu_memory_mib=self.peak_gpu_memory_mib(),
        )

    def peak_gpu_memory_mib(self) -> float:
        """Peak memory torch allocated on this trainer's GPU since the last `train` began (0 on CPU)."""
        if self.device.type != "cuda":
            return 0.0
        return torch.cuda.max_memory_allocated(self.device) / 2**20

    def _check_gate(self, iteration: int, log: LogFn) -> None:
        score = self.validation_dice(self.validation)
        self.cross_term_enabled = score is not None and score >= self.config.cps_gate
        log(f"CPS gate at iteration {iteration}: validation Dice {score:.3f} "
            f"{'>=' if self.cross_term_enabled else '<'} {self.config.cps_gate}: cross term "
            f"{'on' if self.cross_term_enabled else 'off'}")

    # ----------------------------------------------------------------------------------------- signals
    def validation_dice(self, volumes: Sequence, *, step: float = 0.5) -> float | None:
        """Mean Dice of the pair (mean of both softmaxes) on labeled validation volumes, on the
        preprocessed grid: the gate signal for the cross term. None without volumes."""
        from common.inference import sliding_window_predict
        from common.metrics import dice

        scores = []
        for volume in volumes:
            data, seg, _ = volume.load(mmap=True)
            data = torch.from_numpy(np.array(data, dtype=np.float32))  # writable copy of the memmap
            probabilities = sliding_window_predict(list(self.nets.values()), data, self.params.patch_size, step=step)
            scores.append(dice(probabilities.argmax(0).numpy() > 0, np.asarray(seg[0]) > 0))
        return float(np.mean(scores)) if scores else None

    def branch_agreement(self, volumes: Mapping[str, Sequence] | Sequence, max_per_phase: int = 2,
                         *, step: float = 0.5) -> dict[str, float]:
        """Mean Dice between the two branches' argmax per phase: the label-free quality signal.

        volumes: PreprocessedVolume objects (grouped by `.phase`) or a mapping phase -> volumes; the
        first `max_per_phase` per phase (by case id) are predicted with a sliding window, one net each.
        """
        from common.inference import sliding_window_predict
        from common.metrics import dice

        if isinstance(volumes, Mapping):
            groups = {phase: list(vs) for phase, vs in volumes.items()}
        else:
            groups: dict[str, list] = defaultdict(list)
            for v in volumes:
                groups[v.phase].append(v)
        patch = self.params.patch_size
        result: dict[str, float] = {}
        for phase in sorted(groups):
            chosen = sorted(groups[phase], key=lambda v: v.case_id)[:max(0, max_per_phase)]
            scores = []
            for volume in chosen:
                data, _, _ = volume.load(mmap=True)
                data = torch.from_numpy(np.array(data, dtype=np.float32))  # writable copy of the memmap
                pred = {b: sliding_window_predict(self.nets[b], data, patch, step=step).argmax(0).numpy()
                        for b in BRANCHES}
                scores.append(dice(*(pred[b] for b in BRANCHES)))
            if scores:
                result[phase] = float(np.mean(scores))
        return result


__all__ = ["TrainerConfig", "TrainStats", "CPSTrainer", "use_channels_last_convs",
           "peak_rss_mib"]
