"""Typed, validated configuration of the data layer (the ``data:`` block of a run config).

Every field has a default that suits the CPU debug run (synthetic data); ImageNet configs set
``dataset: imagefolder``, ``root`` and usually ``loader: dali``. Unknown keys are an error that
lists the valid ones (pydantic ``extra="forbid"``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Fashion-MNIST (data/idx.py): pixel statistics of the training set on [0, 1], computed on the
# 28x28 images (before padding) with float64: mean 0.28604, std 0.35302; 28x28 padded to 32x32.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_SIZE = 32

# The classic ImageNet eval recipe: resize the shorter side to 256, centre-crop 224.
DEFAULT_VAL_RESIZE_RATIO = 256 / 224


class DaliConfig(BaseModel):
    """Options of the DALI pipelines (used when ``data.loader`` resolves to ``dali``)."""

    model_config = ConfigDict(extra="forbid")

    # "auto": mixed (nvJPEG) decode + GPU augmentation when the loader's device is CUDA,
    # CPU-only pipeline (device_id=None) otherwise. "cpu" forces the CPU-only pipeline even on
    # a GPU machine (the batches are still copied to the training device).
    device: Literal["auto", "cpu", "gpu"] = "auto"
    # DALI worker threads per rank; None = data.num_workers (same CPU budget as torchvision).
    num_threads: int | None = Field(default=None, ge=1)
    prefetch_queue_depth: int = Field(default=2, ge=1)
    # Reader-side read-ahead buffer (files); DALI's default behaviour.
    read_ahead: bool = False
    # Mixed decode only: share of the images sent to the hardware JPEG decoder (A100/H100) rather
    # than the CUDA decoder (0.65 is DALI's own default).
    hw_decoder_load: float = Field(default=0.65, ge=0.0, le=1.0)
    # Antialiased resize of the train random-resized-crop. Off by default, as in NVIDIA's
    # DeepLearningExamples ResNet-50 DALI pipeline: it is the most expensive CPU op of the train
    # pipeline (DALI CPU / torchvision: 1.30x with it, 1.59x without, BENCHMARKS.md), and the crop
    # is a random augmentation anyway. Val always resizes antialiased, matching torchvision.
    train_antialias: bool = False
    # Mixed decode only: nvJPEG's device / host buffer padding (bytes) and the HW decoder's preallocation
    # (largest image, pixels), so the decoder allocates once instead of growing its buffers (a cudaMalloc
    # and sync each time) on every larger image. NVIDIA DeepLearningExamples' ResNet-50 values: 211 MB /
    # 140 MB padding, 5980 x 6430 = the largest ImageNet train image. 0 turns a hint off.
    device_memory_padding: int = Field(default=211_025_920, ge=0)
    host_memory_padding: int = Field(default=140_544_512, ge=0)
    preallocate_width_hint: int = Field(default=5980, ge=0)
    preallocate_height_hint: int = Field(default=6430, ge=0)


class DataConfig(BaseModel):
    """Where the images come from and how they become normalised NCHW batches."""

    model_config = ConfigDict(extra="forbid")

    dataset: Literal["synthetic", "imagefolder", "digits", "fashion_mnist"] = "synthetic"
    # "auto": torchvision for every dataset (DALI only when asked: it needs JPEG files on disk
    # and pays a train pipeline build per epoch, which only large datasets amortise).
    loader: Literal["auto", "torchvision", "dali"] = "auto"
    # imagefolder: the ImageNet root holding train/ and val/. digits: where the generated JPEG
    # tree lives (None = ~/.cache/addernet_dist/digits). fashion_mnist: the folder of IDX files
    # (None = Debian's /usr/share/datasets/fashion-mnist). Unused by synthetic.
    root: Path | None = None
    train_split: str = "train"
    val_split: str = "val"

    image_size: int = Field(default=224, ge=8)
    # Val: resize the shorter side to round(image_size * ratio), centre crop image_size.
    # None = 256/224 with ImageNet-style augmentation, 1.0 (plain resize) otherwise.
    val_resize_ratio: float | None = Field(default=None, ge=1.0, le=2.0)
    # Train augmentation. "auto": random_resized_crop for imagefolder, pad_crop for digits,
    # none for synthetic and fashion_mnist (its in-memory IDX loader, data/idx.py, does none).
    augment: Literal["auto", "random_resized_crop", "pad_crop", "none"] = "auto"
    # Random-resized-crop ranges (Inception recipe, the ones the AdderNet paper's code uses).
    min_crop_area: float = Field(default=0.08, gt=0.0, le=1.0)
    crop_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # pad_crop: zero padding on each side before the random crop (CIFAR recipe: 4 px at 32).
    pad: int = Field(default=4, ge=0)
    # Random horizontal flip; None = on for imagefolder, off for digits/fashion_mnist (a
    # mirrored digit is a different glyph) and synthetic.
    hflip: bool | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    num_workers: int = Field(default=4, ge=0)
    pin_memory: bool = True
    # How an undecodable image met while loading is handled: always an error naming the file
    # (a skip would silently change batch composition and break exact resume). Run
    # `addernet-data check ROOT` before a long job to find such files up front.
    on_corrupt: Literal["raise"] = "raise"

    synthetic_train_size: int = Field(default=1024, ge=1)
    synthetic_val_size: int = Field(default=256, ge=1)
    synthetic_num_classes: int = Field(default=10, ge=2)
    synthetic_channels: int = Field(default=3, ge=1)
    # Seed of the synthetic *dataset* (class templates, noise); the run seed only shuffles.
    synthetic_seed: int = 0

    dali: DaliConfig = Field(default_factory=DaliConfig)
    # RandAugment (Cubuk et al. 2019) of TRAIN images, after the crop/flip, on uint8 pixels: this many
    # randomly chosen ops per image (0: off) at this magnitude of 31 bins (0..30), the convention of
    # torchvision's RandAugment and DALI's auto_aug.rand_augment (e.g. 2 and 9, timm's rand-m9-n2).
    # Image-file loaders only (torchvision, dali); the in-memory synthetic / fashion_mnist loaders refuse.
    randaugment_ops: int = Field(default=0, ge=0)
    # RandAugment magnitude bin (0..30 of 31); only with randaugment_ops > 0.
    randaugment_magnitude: int = Field(default=9, ge=0, le=30)

    @model_validator(mode="before")
    @classmethod
    def _dataset_defaults(cls, data: Any) -> Any:
        """Per-dataset defaults, decided here (the resolved config then shows them).

        fashion_mnist: 32x32 (28x28 zero-padded, paper §5.2) and the data set's 1-channel
        statistics unless given. The ImageNet defaults (224, 3-channel mean/std) count as not
        given: configs saved by earlier versions dump them for every dataset, and no
        Fashion-MNIST run can use them.
        """
        if not isinstance(data, dict) or data.get("dataset") != "fashion_mnist":
            return data
        data = dict(data)
        for key, default, imagenet in (
            ("image_size", FASHION_MNIST_SIZE, 224),
            ("mean", (FASHION_MNIST_MEAN,), IMAGENET_MEAN),
            ("std", (FASHION_MNIST_STD,), IMAGENET_STD),
        ):
            value = data.get(key)
            given = tuple(value) if isinstance(value, list | tuple) else value
            if value is None or given == imagenet:
                data[key] = default
        return data

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.dataset == "imagefolder" and self.root is None:
            raise ValueError(
                "data.root is required for dataset 'imagefolder': set data.root=/path/to/imagenet "
                "(expected layout: ROOT/train/<wnid>/*.JPEG and ROOT/val/...)"
            )
        if len(self.mean) != len(self.std):
            raise ValueError(
                f"data.mean has {len(self.mean)} values but data.std has {len(self.std)}; "
                "give one value per channel in both"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"data.std must be positive, got {self.std}")
        lo, hi = self.crop_aspect_ratio
        if not 0 < lo <= hi:
            raise ValueError(
                f"data.crop_aspect_ratio must be (low, high) with 0 < low <= high, got {self.crop_aspect_ratio}"
            )
        if self.dataset == "fashion_mnist":
            if self.augment not in ("auto", "none"):
                raise ValueError(
                    f"data.augment={self.augment!r}: the fashion_mnist loader does no augmentation "
                    "(paper §5.2 names none); set data.augment=none or leave it unset"
                )
            if len(self.mean) != 1:
                raise ValueError(
                    f"data.mean={list(self.mean)}: Fashion-MNIST has 1 channel, give one value"
                )
        if self.randaugment_ops and self.dataset in ("synthetic", "fashion_mnist"):
            loader = "data/synthetic.py" if self.dataset == "synthetic" else "data/idx.py"
            raise ValueError(
                f"data.randaugment_ops={self.randaugment_ops}: the {self.dataset} loader ({loader}, "
                "in-memory float tensors) has no RandAugment; it runs in the image-file loaders "
                "(dataset imagefolder/digits with loader torchvision or dali). Set data.randaugment_ops=0"
            )
        if self.dataset in ("synthetic", "fashion_mnist") and self.loader == "dali":
            raise ValueError(
                f"data.loader 'dali' needs JPEG files; dataset '{self.dataset}' is held in "
                "memory. Use data.loader=auto with it (or dataset imagefolder/digits for DALI)"
            )
        return self

    # ---- resolved values (one place decides each "auto") -------------------------------------

    @property
    def resolved_augment(self) -> str:
        if self.augment != "auto":
            return self.augment
        return {
            "imagefolder": "random_resized_crop",
            "digits": "pad_crop",
        }.get(self.dataset, "none")

    @property
    def resolved_hflip(self) -> bool:
        if self.hflip is not None:
            return self.hflip
        return self.dataset == "imagefolder"

    @property
    def resolved_val_resize_ratio(self) -> float:
        if self.val_resize_ratio is not None:
            return self.val_resize_ratio
        return DEFAULT_VAL_RESIZE_RATIO if self.resolved_augment == "random_resized_crop" else 1.0

    @property
    def resolved_loader(self) -> str:
        return "torchvision" if self.loader == "auto" else self.loader
