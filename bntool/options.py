"""The command line's option groups: flags shared by several commands, each group parsed once into a dataclass.

A command declares a parameter typed by a group (`model: ModelSource`); `@grouped` expands it into the
group's flags for Typer and hands the command the built dataclass (polygraphy's argument groups in Typer
terms). Imports neither torch nor the library at module level, so `bntool --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, get_type_hints

import typer

from .choices import RecalibrationMode
from .errors import InputError, user_code

# ---------------------------------------------------------------- groups


@dataclass
class ModelSource:
    """Where the model comes from."""

    ckpt: Annotated[Path, typer.Argument(
        metavar="CKPT", help="Checkpoint: state_dict (.pt/.pth/.bin/.safetensors), training checkpoint dict, "
                             "pickled module, or TorchScript archive.")]
    arch: Annotated[Optional[str], typer.Option(
        "--arch", help="Model factory for state_dicts: 'module.path:callable' (e.g. torchvision.models:resnet18; "
                       "./mymodels.py is found as mymodels:build) or timm:NAME (timm's registry, e.g. "
                       "timm:efficientnet_b0).")] = None
    arch_kwargs: Annotated[Optional[str], typer.Option(
        "--arch-kwargs", help="JSON object of keyword arguments for --arch, e.g. '{\"num_classes\": 10}'.")] = None
    key: Annotated[Optional[str], typer.Option("--key", help="Key of the state_dict inside a training "
                                                             "checkpoint, or the prefix of the weights to take "
                                                             "inside a state_dict (ema: the 'ema.' copy).")] = None
    trust_pickle: Annotated[bool, typer.Option(
        "--trust-pickle", help="Allow loading pickled modules (runs code from the file: only for files you "
                               "trust).")] = False

    def load(self):
        """The Checkpoint (bntool.checkpoint.load_checkpoint)."""
        from .checkpoint import load_checkpoint

        return load_checkpoint(self.ckpt, arch=self.arch, arch_kwargs=self.arch_kwargs, key=self.key,
                               trust_pickle=self.trust_pickle)


@dataclass
class ExampleInputs:
    """The example input the model is traced and checked with."""

    input_shape: Annotated[Optional[list[str]], typer.Option(
        "--input-shape", help="Example input shape, e.g. 1,3,224,224; repeat for several inputs (default for "
                              "timm models: one image of the size in their pretrained_cfg).")] = None
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Input dtype (default: the model's floating "
                                                                 "dtype).")] = None
    seed: Annotated[int, typer.Option("--seed", help="Seed for random inputs.")] = 0

    def build(self, model, required: bool = True, notes: list[str] | None = None):
        """Random example inputs of the given shapes and dtype (None if no shape and not `required`). Without
        --input-shape, a model that declares its input size (timm's pretrained_cfg) gives one image of that
        size, and `notes` says so."""
        import torch

        from .devices import model_dtype

        if not self.input_shape:
            self.input_shape = _declared_input_shape(model, notes)
        if not self.input_shape:
            if required:
                raise InputError("--input-shape is required, e.g. --input-shape 1,3,224,224")
            return None
        torch_dtype: Any
        if self.dtype is None:
            torch_dtype = model_dtype(model)
        else:
            torch_dtype = getattr(torch, self.dtype, None)
            if not isinstance(torch_dtype, torch.dtype):
                raise InputError(f"--dtype {self.dtype!r}: not a torch dtype (float32, float16, bfloat16, float64, "
                                 "int64, …)")
        g = torch.Generator().manual_seed(self.seed)
        inputs = []
        for text in self.input_shape:
            shape = parse_shape(text)
            try:
                if torch_dtype.is_floating_point:
                    inputs.append(torch.randn(shape, generator=g).to(torch_dtype))
                else:
                    inputs.append(torch.randint(0, 2, shape, generator=g).to(torch_dtype))
            except (RuntimeError, MemoryError) as e:  # the allocator's refusal: the shape asks too much
                size = torch.Size(shape).numel() * torch.empty((), dtype=torch_dtype).element_size()
                raise InputError(f"--input-shape {text}: cannot allocate {size / 2**30:,.1f} GiB for the example "
                                 f"input ({type(e).__name__})") from e
        return tuple(inputs)


def _declared_input_shape(model, notes: list[str] | None) -> list[str] | None:
    """--input-shape as the model's own data config gives it (one image), or None."""
    from .data import model_data_config

    size = model_data_config(model).get("input_size")  # checked there: three positive ints, or absent
    if size is None:
        return None
    shape = ",".join(str(d) for d in (1, *size))
    if notes is not None:
        notes.append(f"example input {shape} from the model's pretrained_cfg (--input-shape sets another)")
    return [shape]


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' (or 1x3x224x224) as a tuple of positive ints; any other part (a letter, an empty part
    between two commas) is an error, never dropped."""
    try:
        dims = tuple(int(part) for part in re.split(r"[,x×]", text.strip()))
    except ValueError:
        raise InputError(f"--input-shape {text!r}: expected comma-separated positive integers "
                         "like 1,3,224,224") from None
    if not dims or any(d <= 0 for d in dims):
        raise InputError(f"--input-shape {text!r}: expected comma-separated positive integers like 1,3,224,224")
    return dims


@dataclass
class DataOptions:
    """Calibration or check data: where it comes from and how images are preprocessed."""

    data: Annotated[Optional[Path], typer.Option("--data", help="Calibration data: a folder of images (recursive), "
                                                                "or a .npy/.npz/.pt tensor file.")] = None
    loader: Annotated[Optional[str], typer.Option(
        "--loader", help="Your own data: 'module.path:callable' returning an iterable of batches (e.g. a "
                         "DataLoader).")] = None
    loader_kwargs: Annotated[Optional[str], typer.Option("--loader-kwargs", help="JSON keyword arguments for "
                                                                                 "--loader.")] = None
    input_key: Annotated[Optional[str], typer.Option("--input-key", help="Key of the input in dict "
                                                                         "batches.")] = None
    npz_key: Annotated[Optional[str], typer.Option("--npz-key", help="Array to use from an .npz file.")] = None
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", help="Batch size for --data.")] = 32

    @property
    def given(self) -> bool:
        return self.data is not None or self.loader is not None

    def open(self, image=None, *, model=None, input_shape=None, workers: int = 0, strict: bool = False,
             seed: int = 0, rank: int = 0, world_size: int = 1):
        """The DataSource (bntool.data.open_data); images are preprocessed as `image` (an ImageOptions),
        `input_shape` and the model's own data config say, in that order (bntool.data.resolve_preprocessing)."""
        from .data import open_data

        return open_data(self.data, loader=self.loader, loader_kwargs=self.loader_kwargs,
                           batch_size=self.batch_size, num_workers=workers, image=image, model=model,
                           input_shape=input_shape, npz_key=self.npz_key, input_key=self.input_key, strict=strict,
                           seed=seed, rank=rank, world_size=world_size)

    def batches(self, num_batches: int, example, *, model=None, image=None, workers: int = 0,
                fixed_batch: bool = False):
        """At most `num_batches` batches in the example input's dtype, each checked to fit it, for a numerical
        check; and the DataSource they came from. (None, None) without data. `fixed_batch`: for a graph whose
        batch size is fixed, batches are cut to the example's batch size (a smaller remainder is left out)."""
        if not self.given:
            return None, None
        from .data import check_fits

        source = self.open(image, model=model, input_shape=tuple(example.shape), workers=workers)
        batches: list[Any] = []
        stream = iter(source)
        while len(batches) < num_batches:
            try:
                with user_code("reading the check data"):
                    x = next(stream)
            except StopIteration:
                break
            check_fits(x, example, str(self.data) if self.data is not None else f"--loader {self.loader}")
            pieces = [p for p in x.split(len(example)) if len(p) == len(example)] if fixed_batch else [x]
            batches.extend(p.to(example.dtype) for p in pieces)
        return batches[:num_batches], source


@dataclass
class ImagePreprocessing:
    """How images of a --data folder become model inputs. A value not given comes from --input-shape (size,
    channels), then from the model's own data config (timm's pretrained_cfg), then from the ImageNet defaults."""

    workers: Annotated[int, typer.Option("--workers", help="DataLoader worker processes for image folders.")] = 2
    image_size: Annotated[Optional[int], typer.Option(
        "--image-size", help="Image side after the crop (default: from --input-shape, the model's config, "
                             "or 224).")] = None
    resize: Annotated[Optional[int], typer.Option(
        "--resize", help="Shorter side before the crop (default: image size / the model's crop_pct, or "
                         "image size·256/224).")] = None
    center_crop: Annotated[Optional[bool], typer.Option(
        "--center-crop/--no-center-crop", help="Resize the shorter side then center-crop (default), or resize "
                                               "straight to the size.", show_default=False)] = None
    interpolation: Annotated[Optional[str], typer.Option(
        "--interpolation", help="bilinear, bicubic, nearest, lanczos, box or hamming (default: the model's "
                                "config, or bilinear).")] = None
    mean: Annotated[Optional[str], typer.Option("--mean", help="Per-channel mean to subtract (default: the model's "
                                                               "config, or ImageNet 0.485,0.456,0.406).")] = None
    std: Annotated[Optional[str], typer.Option("--std", help="Per-channel std (default: the model's config, or "
                                                             "ImageNet 0.229,0.224,0.225).")] = None

    def image_options(self):
        """The ImageOptions given (None where not given: bntool.data.resolve_preprocessing fills them in)."""
        from .data import ImageOptions

        return ImageOptions(image_size=self.image_size, resize=self.resize, center_crop=self.center_crop,
                            interpolation=self.interpolation, mean=parse_floats(self.mean, "--mean"),
                            std=parse_floats(self.std, "--std"))


def parse_floats(text: str | None, option: str) -> tuple[float, ...] | None:
    """'0.485,0.456,0.406' as floats (None for None)."""
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{option} {text!r}: expected comma-separated numbers like 0.485,0.456,0.406") from None


@dataclass
class Tolerances:
    """--rtol/--atol: elementwise |Δ| ≤ atol + rtol·|reference|; atol is absolute when given, else a share of the
    output's largest magnitude."""

    rtol: Annotated[Optional[float], typer.Option(
        "--rtol", help="Elementwise relative tolerance: an element passes when |Δ| ≤ atol + rtol·|ref| "
                       "(default by check: 1e-4 for ONNX, 0 for fold).")] = None
    atol: Annotated[Optional[float], typer.Option(
        "--atol", help="Elementwise absolute tolerance (default: a share of the output's largest magnitude, "
                       "1e-4 for float32).")] = None


@dataclass
class Device:
    """Where PyTorch runs the model."""

    device: Annotated[str, typer.Option(
        "--device", help="Where PyTorch runs the model: cpu, cuda, cuda:N or mps. Inputs and data are moved there; "
                         "files written load on any machine.")] = "cpu"

    def resolve(self):
        """The torch.device, checked against this machine (bntool.devices.resolve_device)."""
        from .devices import resolve_device

        return resolve_device(self.device)


@dataclass
class FileOutput:
    """The file a command writes."""

    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the result.")]
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False
    in_place: Annotated[bool, typer.Option("--in-place", help="Allow the output to be the input file.")] = False


@dataclass
class Display:
    """How the result is shown."""

    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No tables, progress or notes; warnings and errors "
                                                              "only.")] = False


@dataclass
class RecalibrationOptions:
    """How `recalibrate` re-estimates statistics: the mode and its settings, how much data, precision and memory
    format, the seed, the plot, the input shape for image folders, and the cache budget of exact mode."""

    mode: Annotated[Optional[RecalibrationMode], typer.Option(
        "--mode", show_default=False,
        help="cumulative (exact pooled average, train-mode normalization), ema (as training does) or "
             "exact (eval-mode statistics, batch-size independent); an ONNX file: exact only. "
             "[default: cumulative; exact for an ONNX file]")] = None
    momentum: Annotated[float, typer.Option("--momentum", help="EMA momentum for --mode ema.")] = 0.1
    reset: Annotated[bool, typer.Option("--reset/--no-reset", help="--mode ema: start from 0/1 statistics or "
                                                                   "from the current ones.")] = True
    num_batches: Annotated[Optional[int], typer.Option("--num-batches", help="Use at most this many batches.")] = None
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", help="Use at most this many samples.")] = None
    amp: Annotated[bool, typer.Option("--amp", help="Autocast (bfloat16 on CPU, float16 on CUDA).")] = False
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Run in channels_last memory format.")] = False
    seed: Annotated[int, typer.Option("--seed", help="Seed for data order and random choices.")] = 0
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Also draw the per-layer statistics shift "
                                                                "(PNG/SVG/PDF; needs matplotlib).")] = None
    input_shape: Annotated[Optional[str], typer.Option(
        "--input-shape", help="The model's input shape, e.g. 1,3,64,64: the image size (and channels) for an "
                              "image folder; tensor data must fit it.")] = None
    strict: Annotated[bool, typer.Option("--strict", help="Fail on an unreadable image instead of skipping "
                                                          "it.")] = False
    prior: Annotated[Optional[float], typer.Option(
        "--prior", help="cumulative/exact: blend with the checkpoint's statistics as N source samples "
                        "(Schneider et al. 2020); helps with few calibration images.")] = None
    cache_budget: Annotated[Optional[str], typer.Option(
        "--cache-budget", help="--mode exact: memory for cached activations, e.g. 4G, 512M, 0 for none "
                               "(default: half the free memory of the device).")] = None

    def shape(self) -> tuple[int, ...] | None:
        """--input-shape as a tuple (None when not given)."""
        return parse_shape(self.input_shape) if self.input_shape else None

    def budget(self) -> int | None:
        """--cache-budget in bytes (None when not given: the library chooses)."""
        from .segments import parse_bytes

        return None if self.cache_budget is None else parse_bytes(self.cache_budget)

    def torch_only_flags(self) -> list[str]:
        """The flags given that an ONNX file cannot take (it is recalibrated in onnxruntime, exact mode only)."""
        return [flag for flag, on in (("--mode", self.mode not in (None, RecalibrationMode.EXACT)),
                                      ("--amp", self.amp), ("--channels-last", self.channels_last),
                                      ("--prior", self.prior is not None)) if on]

    def torch_options(self) -> dict[str, Any]:
        """The keyword arguments of bntool.recalibrate these options give (parsed, defaults filled in)."""
        return dict(mode=self.mode or RecalibrationMode.CUMULATIVE, momentum=self.momentum, reset=self.reset,
                    num_batches=self.num_batches, num_samples=self.num_samples, amp=self.amp,
                    channels_last=self.channels_last, prior=self.prior, cache_budget=self.budget())


GROUPS = (ModelSource, ExampleInputs, DataOptions, ImagePreprocessing, Tolerances, Device, FileOutput, Display,
          RecalibrationOptions)


# ---------------------------------------------------------------- expansion for Typer


def grouped(**defaults: Any):
    """Expand each parameter typed by an option group into the group's flags; call with the built groups.

    `defaults` overrides a flag's default for this command, e.g. `@grouped(batch_size=8)`.
    """

    def wrap(func):
        hints = get_type_hints(func, include_extras=True)
        signature = inspect.signature(func)
        params: list[inspect.Parameter] = []
        groups: dict[str, type] = {}
        for p in signature.parameters.values():
            hint = hints.get(p.name, p.annotation)
            if hint in GROUPS:
                groups[p.name] = hint
                field_hints = get_type_hints(hint, include_extras=True)
                for f in dataclasses.fields(hint):
                    default = defaults.get(f.name, f.default)
                    if default is dataclasses.MISSING:
                        default = inspect.Parameter.empty
                    params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                                    annotation=field_hints[f.name], default=default))
            else:
                params.append(p.replace(annotation=hint, kind=inspect.Parameter.KEYWORD_ONLY))
        # Arguments and options without defaults first, as Python requires of a signature.
        params.sort(key=lambda p: p.default is not inspect.Parameter.empty)

        @functools.wraps(func)
        def command(**kwargs):
            for name, group in groups.items():
                names = [f.name for f in dataclasses.fields(group)]
                kwargs[name] = group(**{n: kwargs.pop(n) for n in names})
            return func(**kwargs)

        command.__signature__ = signature.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # Typer must see the expanded signature, not the original's
        return command

    return wrap


