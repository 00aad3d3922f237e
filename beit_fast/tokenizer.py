"""Visual tokenizers: images -> a grid of discrete token ids, the targets of BEiT pretraining.

`VisualTokenizer` is the interface every tokenizer implements.

- `DalleTokenizer`: the DALL-E dVAE (SPEC section 4) as plain `nn.Conv2d` networks
  (`DalleEncoder`, `DalleDecoder`), loadable from the published `encoder.pkl` / `decoder.pkl`
  without the `dall_e` package and without running pickled code (`load_dalle_encoder`,
  `load_dalle_decoder`: a restricted unpickler admits only the classes such a file needs), from
  plain state dicts of our modules, or from a `beit-fast dvae` checkpoint of `train/train_tokenizer.py`.
  A file that cannot be loaded raises FileNotFoundError, `PickleRefusedError` or `TokenizerFileError`,
  each with a one-line message that names the file.
- `RandomConvTokenizer`: a fixed, randomly initialised patchify conv + nearest random code
  (cosine) - gives targets that depend on local image content, so masked prediction is learnable
  (it is NOT a semantic tokenizer: runs with it say so in their logs).
"""

from __future__ import annotations

import _compat_pickle
import math
import os
import pickle
import re
import stat
import types
import warnings
import zipfile
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Tuple, Type, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from beit_fast.config import first_line

__all__ = [
    "VisualTokenizer",
    "RandomConvTokenizer",
    "DalleTokenizer",
    "DalleEncoder",
    "DalleDecoder",
    "load_dalle_encoder",
    "load_dalle_decoder",
    "PickleRefusedError",
    "TokenizerFileError",
    "map_pixels",
    "unmap_pixels",
    "decoded_images",
    "LOGIT_LAPLACE_EPS",
]

LOGIT_LAPLACE_EPS = 0.1

PathLike = Union[str, "os.PathLike[str]"]


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """DALL-E's logit-Laplace pixel map: [0, 1] -> [eps, 1 - eps]."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `map_pixels`, clamped to [0, 1]."""
    return ((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS)).clamp(0, 1)


def decoded_images(out: torch.Tensor) -> torch.Tensor:
    """Decoder output (B, 2*C, H, W) logit-Laplace parameters -> images (B, C, H, W) in [0, 1].

    The first C channels are the location (in logit space) of each mapped pixel: sigmoid, then unmap."""
    return unmap_pixels(torch.sigmoid(out[:, : out.shape[1] // 2].float()))


class VisualTokenizer(nn.Module):
    """images float (B, 3, S, S) in [0, 1] -> LongTensor (B, grid * grid) of ids in [0, vocab_size)."""

    vocab_size: int
    grid_size: int
    image_size: int
    description: str = "visual tokenizer"

    def check_images(self, images: torch.Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            want = ", ".join(map(str, expected))
            raise ValueError(f"tokenizer expects (B, {want}) images, got {tuple(images.shape)}")

    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RandomConvTokenizer(VisualTokenizer):
    """Fixed random tokenizer: linear conv(k=s=image_size/grid) of centred pixels -> L2-normalise ->
    argmax of the cosine against `vocab_size` random code vectors. (No nonlinearity before the
    argmax: features of a ReLU/GELU net sit in one cone and a handful of codes would win.)

    The weights are a deterministic function of `seed`, so every process and every resumed run
    produces the same targets; it is never trained (no parameter requires grad)."""

    def __init__(self, vocab_size: int, grid_size: int, image_size: int, width: int = 64, seed: int = 0) -> None:
        super().__init__()
        if image_size % grid_size:
            raise ValueError(f"image_size {image_size} must be a multiple of grid_size {grid_size}")
        self.vocab_size, self.grid_size, self.image_size = vocab_size, grid_size, image_size
        self.description = f"fixed random conv tokenizer (vocab {vocab_size}, seed {seed}; not a trained dVAE)"
        stride = image_size // grid_size
        self.embed = nn.Conv2d(3, width, kernel_size=stride, stride=stride, bias=False)
        self.head = nn.Conv2d(width, vocab_size, kernel_size=1, bias=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
                p.requires_grad_(False)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        h = F.normalize(self.embed(map_pixels(images.float()) - 0.5), dim=1)
        return self.head(h).argmax(1).flatten(1)


# ----------------------------------------------------------------------------------------------
# The DALL-E dVAE as plain nn.Conv2d networks. Module names follow the `dall_e` package exactly
# (blocks.group_1.block_1.res_path.conv_1 ...), so its parameters map 1:1 (w -> weight, b -> bias).


def _dalle_conv(n_in: int, n_out: int, kw: int) -> nn.Conv2d:
    """dall_e.utils.Conv2d: 'same' padding, weights N(0, 1 / fan_in), zero bias."""
    conv = nn.Conv2d(n_in, n_out, kw, padding=(kw - 1) // 2)
    with torch.no_grad():
        conv.weight.normal_(std=1 / math.sqrt(n_in * kw**2))
        conv.bias.zero_()
    return conv


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: must be a positive int")


class _DalleBlock(nn.Module):
    """x -> id_path(x) + res_path(x) / n_layers**2, with n_layers the blocks of the whole network.

    id_path is a 1x1 conv when the width changes, else the identity; res_path is
    relu, conv(n_in -> n_out/4), relu, conv, relu, conv, relu, conv(-> n_out) with kernel sizes
    `KERNELS` (encoder 3,3,3,1; decoder 1,3,3,3)."""

    KERNELS: Tuple[int, int, int, int]
    DALLE_NAME: str

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        if n_out % 4:
            raise ValueError(f"block width {n_out} must be a multiple of 4")
        self.n_in, self.n_out, self.n_layers = n_in, n_out, n_layers
        n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = _dalle_conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        k1, k2, k3, k4 = self.KERNELS
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()),
            ("conv_1", _dalle_conv(n_in, n_hid, k1)),
            ("relu_2", nn.ReLU()),
            ("conv_2", _dalle_conv(n_hid, n_hid, k2)),
            ("relu_3", nn.ReLU()),
            ("conv_3", _dalle_conv(n_hid, n_hid, k3)),
            ("relu_4", nn.ReLU()),
            ("conv_4", _dalle_conv(n_hid, n_out, k4)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoderBlock(_DalleBlock):
    KERNELS = (3, 3, 3, 1)
    DALLE_NAME = "dall_e.encoder.EncoderBlock"


class DalleDecoderBlock(_DalleBlock):
    KERNELS = (1, 3, 3, 3)
    DALLE_NAME = "dall_e.decoder.DecoderBlock"


class DalleEncoder(nn.Module):
    """The DALL-E dVAE encoder: mapped pixels (B, C, H, W) -> logits (B, vocab_size, H/d, W/d), d = 2**(groups-1).

    input 7x7 conv C -> n_hid; group g (1..group_count) of `n_blk_per_group` blocks at width
    n_hid * 2**(g-1), a 2x2 max-pool after every group but the last; output relu + 1x1 conv to
    `vocab_size`. The defaults are the published model (8x down, 112px -> 14x14, 8192 codes).
    `group_count` != 4 goes beyond the `dall_e` package, whose four groups are hard-wired (there
    group_count only sets the residual gain); such models train and load from our own files.
    Unlike the package, widths below 64 and vocabularies below 512 are allowed (small presets).
    """

    DALLE_NAME = "dall_e.encoder.Encoder"

    def __init__(
        self,
        group_count: int = 4,  # groups of blocks; 2**(group_count - 1) downsampling
        n_hid: int = 256,  # width of the first group (DALL-E: 256; the last group is 8x at 4 groups)
        n_blk_per_group: int = 2,  # residual blocks per group
        input_channels: int = 3,
        vocab_size: int = 8192,  # codebook size
    ) -> None:
        super().__init__()
        _check_positive(group_count=group_count, n_hid=n_hid, n_blk_per_group=n_blk_per_group,
                        input_channels=input_channels, vocab_size=vocab_size)
        if n_hid % 4:
            raise ValueError(f"n_hid={n_hid}: must be a multiple of 4")
        self.group_count, self.n_hid, self.n_blk_per_group = group_count, n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = group_count * n_blk_per_group
        layers: List[Tuple[str, nn.Module]] = [("input", _dalle_conv(input_channels, n_hid, 7))]
        width = n_hid
        for g in range(group_count):
            out = n_hid * 2**g
            group: List[Tuple[str, nn.Module]] = []
            for i in range(n_blk_per_group):
                group.append((f"block_{i + 1}", DalleEncoderBlock(width, out, n_layers)))
                width = out
            if g < group_count - 1:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", _dalle_conv(width, vocab_size, 1)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def feature_channels(self) -> int:
        return self.n_hid * 2 ** (self.group_count - 1)

    @property
    def head(self) -> nn.Conv2d:
        """The final 1x1 conv (feature_channels -> vocab_size), `blocks.output.conv`. A property, not a
        submodule alias, so the state dict keeps the package's names only."""
        return self.blocks.output.conv

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.input_channels:
            raise ValueError(f"encoder expects (B, {self.input_channels}, H, W) mapped pixels, got {tuple(x.shape)}")
        if x.shape[2] % self.downsample or x.shape[3] % self.downsample:
            raise ValueError(f"image side must be a multiple of {self.downsample}, got {tuple(x.shape[2:])}")

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """Mapped pixels (B, C, H, W) -> features (B, feature_channels, H/d, W/d), before the output ReLU."""
        self._check_input(x)
        for name, module in self.blocks.named_children():
            if name != "output":
                x = module(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mapped pixels (B, C, H, W) (`map_pixels` already applied, as for `dall_e`) -> logits (B, vocab, h, w)."""
        return self.blocks.output(self.body(x))


class DalleDecoder(nn.Module):
    """The DALL-E dVAE decoder: codes (B, vocab_size, h, w) (one-hot or soft) -> (B, 2*C, h*d, w*d).

    input 1x1 conv vocab -> n_init; group g (1..group_count) of blocks at width
    n_hid * 2**(group_count-g), nearest 2x upsampling after every group but the last; output relu +
    1x1 conv to 2 * output_channels logit-Laplace parameters (`decoded_images` turns them into pixels).
    """

    DALLE_NAME = "dall_e.decoder.Decoder"

    def __init__(
        self,
        group_count: int = 4,
        n_init: int = 128,  # width after the input conv (DALL-E: 128)
        n_hid: int = 256,  # width of the last group (the first is 8x at 4 groups)
        n_blk_per_group: int = 2,
        output_channels: int = 3,
        vocab_size: int = 8192,
    ) -> None:
        super().__init__()
        _check_positive(group_count=group_count, n_init=n_init, n_hid=n_hid, n_blk_per_group=n_blk_per_group,
                        output_channels=output_channels, vocab_size=vocab_size)
        if n_hid % 4:
            raise ValueError(f"n_hid={n_hid}: must be a multiple of 4")
        self.group_count, self.n_init, self.n_hid, self.n_blk_per_group = group_count, n_init, n_hid, n_blk_per_group
        self.output_channels, self.vocab_size = output_channels, vocab_size
        n_layers = group_count * n_blk_per_group
        layers: List[Tuple[str, nn.Module]] = [("input", _dalle_conv(vocab_size, n_init, 1))]
        width = n_init
        for g in range(group_count):
            out = n_hid * 2 ** (group_count - 1 - g)
            group: List[Tuple[str, nn.Module]] = []
            for i in range(n_blk_per_group):
                group.append((f"block_{i + 1}", DalleDecoderBlock(width, out, n_layers)))
                width = out
            if g < group_count - 1:
                group.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            layers.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
        layers.append(("output", nn.Sequential(OrderedDict([
            ("relu", nn.ReLU()),
            ("conv", _dalle_conv(width, 2 * output_channels, 1)),
        ]))))
        self.blocks = nn.Sequential(OrderedDict(layers))

    @property
    def upsample(self) -> int:
        return 2 ** (self.group_count - 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Codes (B, vocab, h, w) -> logit-Laplace parameters (B, 2 * output_channels, h*d, w*d)."""
        if z.dim() != 4 or z.shape[1] != self.vocab_size:
            raise ValueError(f"decoder expects (B, {self.vocab_size}, h, w) codes, got {tuple(z.shape)}")
        return self.blocks(z)


# ----------------------------------------------------------------------------------------------
# Restricted loading. The published weights are whole pickled modules of the `dall_e` package;
# plain pickle would import that package and call whatever the file names. Here every global the
# file references goes through an allow-list: the package's classes and the torch.nn containers
# become inert stand-ins that only collect their pickled __dict__, tensors are rebuilt by torch's
# own rebuild functions, and anything else is refused before it is looked up.


class PickleRefusedError(pickle.UnpicklingError):
    """A pickle referenced a global outside the allow-list; the message names it (and, raised by the loaders,
    the file)."""


class TokenizerFileError(ValueError):
    """A tokenizer file that cannot be read (empty, truncated, corrupt, a directory, not a torch.save file) or
    does not hold a tokenizer whose weights fit. The message is one line: `FILE: what is wrong`."""


def _file_name(path: PathLike) -> str:
    """The path as messages show it (escaped where a character in it would break the line)."""
    return _escaped(os.fsdecode(os.fspath(path)))


def _escaped(text: str) -> str:
    """`text` with any character that would break a one-line message escaped (a pickle can name anything)."""
    return text if text.isprintable() else repr(text)[1:-1]


def _described(exc: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message` (the type alone where the message is empty); a line longer than `limit`
    is cut after its last whole sentence that fits (torch appends paragraphs of advice to some)."""
    line = first_line(str(exc))
    if len(line) > limit:
        end = line.rfind(". ", 0, limit)
        line = line[: end + 1] if end > 0 else line[: limit - 3] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _in_file(name: str, message: str) -> str:
    """One line `name: message` (the name is not repeated when the message already starts with it)."""
    line = first_line(message)
    return line if line.startswith(f"{name}: ") else f"{name}: {line}"


def _refusal_in(exc: BaseException) -> Optional[PickleRefusedError]:
    """The PickleRefusedError that `exc` is, or was raised from or while handling (torch may wrap what the
    unpickler raises): a refusal is never reported as a corrupt file."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PickleRefusedError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class _StandIn:
    """An inert placeholder for a pickled module: no methods run beyond storing the pickled state."""

    QUALNAME = "?"
    state: Dict[str, Any] = {}  # replaced by the pickled state on BUILD
    dump_patches = False  # read by torch's legacy loader for pickled module classes

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and state[1] is None:
            state = state[0]
        if not isinstance(state, dict):
            kind = type(state).__name__
            raise pickle.UnpicklingError(f"{self.QUALNAME}: expected a dict as pickled state, got {kind}")
        self.state = dict(state)

    def __repr__(self) -> str:
        return f"<pickled {self.QUALNAME}>"


_STANDIN_NAMES = (
    DalleEncoder.DALLE_NAME,
    DalleDecoder.DALLE_NAME,
    DalleEncoderBlock.DALLE_NAME,
    DalleDecoderBlock.DALLE_NAME,
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
)
_STANDINS: Dict[str, Type[_StandIn]] = {
    name: type(f"StandIn_{name.rsplit('.', 1)[1]}", (_StandIn,), {"QUALNAME": name}) for name in _STANDIN_NAMES
}

# Our module types -> the pickled class that sits at the same place in a `dall_e` module tree.
_DALLE_KINDS: Dict[type, str] = {
    nn.Conv2d: "dall_e.utils.Conv2d",
    nn.Sequential: "torch.nn.modules.container.Sequential",
    nn.ReLU: "torch.nn.modules.activation.ReLU",
    nn.MaxPool2d: "torch.nn.modules.pooling.MaxPool2d",
    nn.Upsample: "torch.nn.modules.upsampling.Upsample",
    nn.Identity: "torch.nn.modules.linear.Identity",
}

# Storages (torch.FloatStorage, ...) never reach find_class: torch's loader resolves any name
# containing "Storage" to its own dtype marker first.
_ALLOWED_GLOBALS: Dict[str, Any] = {
    "collections.OrderedDict": OrderedDict,
    "builtins.set": set,
    "torch.device": torch.device,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
    **_STANDINS,
}


class _OpcodeTable(dict):
    """The pure-Python unpickler's opcode table; an unknown opcode is an UnpicklingError (as in the C one), not a
    KeyError."""

    def __missing__(self, opcode: int) -> Any:
        raise pickle.UnpicklingError(f"invalid load key, {repr(bytes([opcode]))[1:]}.")


class _RestrictedUnpickler(pickle._Unpickler):
    """An unpickler whose find_class only answers names in `_ALLOWED_GLOBALS` (and never imports).

    Built on the pure-Python unpickler, not the C one: the C unpickler's memo is an array sized by the
    largest index a PUT names, so a corrupt 9-byte pickle makes it allocate and zero gigabytes (the OOM killer,
    not an exception); the Python one keeps its memo in a dict. A tokenizer pickle is a few thousand objects
    (the tensors' bytes are read by torch), so the speed does not matter."""

    dispatch = _OpcodeTable(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles spell some names the Python 2 way (__builtin__.set); rename as pickle does.
        py3_module, py3_name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        py3_module = _compat_pickle.IMPORT_MAPPING.get(py3_module, py3_module)
        qualname = f"{py3_module}.{py3_name}"
        try:
            return _ALLOWED_GLOBALS[qualname]
        except KeyError:
            pickled = f"{module}.{name}"
            spelled = f" (pickled as `{_escaped(pickled)}`)" if qualname != pickled else ""
            raise PickleRefusedError(
                f"refused to unpickle `{_escaped(qualname)}`{spelled}: not one of the classes a DALL-E dVAE pickle "
                "or a state dict needs (nothing was imported or called)"
            ) from None


def _restricted_load(file: Any, **kwargs: Any) -> Any:
    return _RestrictedUnpickler(file, **kwargs).load()


# What torch.load needs of a `pickle_module`: `Unpickler` (it subclasses it, adding the storage
# lookup and persistent_load) and `load` (the legacy format's header records).
_RESTRICTED_PICKLE = types.ModuleType("beit_fast.tokenizer.restricted_pickle")
_RESTRICTED_PICKLE.Unpickler = _RestrictedUnpickler  # type: ignore[attr-defined]
_RESTRICTED_PICKLE.load = _restricted_load  # type: ignore[attr-defined]
_RESTRICTED_PICKLE.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]


def _restricted_torch_load(path: PathLike) -> Any:
    """`beit_fast.checkpoint.safe_load` (weights only), and for a published DALL-E module pickle torch.load through
    the restricted unpickler, on the CPU. TorchScript archives are refused: torch.load would hand them to
    torch.jit.load, past the unpickler.

    Raises FileNotFoundError (no such file), PickleRefusedError (naming the file and the global), or
    TokenizerFileError for anything else that stops the read (a directory, an empty file, bytes that are not a
    whole torch.save file: torch raises a dozen exception types for those)."""
    name = _file_name(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as exc:  # a parent that is a file, permissions, a name too long...
        raise TokenizerFileError(f"{name}: cannot open ({_described(exc)})") from exc
    if stat.S_ISDIR(info.st_mode):
        raise TokenizerFileError(f"{name}: is a directory, not a tokenizer file")
    if not stat.S_ISREG(info.st_mode):
        raise TokenizerFileError(f"{name}: not a regular file")
    if info.st_size == 0:
        raise TokenizerFileError(f"{name}: not a tokenizer file: empty file")
    # The project's one loader first (weights only: beit-fast's tokenizer.pt and state dicts need nothing more).
    # Only a file whose first non-tensor global is a `dall_e` class - a published whole-module pickle, which a
    # weights-only load cannot read - goes on to the restricted unpickler below; any other global is refused here.
    from beit_fast.checkpoint import CheckpointReadError, UnsafeFileError, safe_load

    try:
        return safe_load(path, what="tokenizer file")
    except UnsafeFileError as exc:
        m = re.search(r"`([^`]+)`", str(exc))
        if m is None:  # a TorchScript archive
            raise PickleRefusedError(_in_file(name, str(exc).split(": ", 1)[-1])) from None
        if not m.group(1).startswith("dall_e."):
            raise PickleRefusedError(f"{name}: refused to unpickle `{_escaped(m.group(1))}`: not one of the classes "
                                     "a DALL-E dVAE pickle or a state dict needs (nothing was imported or called)"
                                     ) from None
    except CheckpointReadError:
        pass  # read again below, where a truncated or foreign file gets its detailed one-line error
    try:
        with open(path, "rb") as f:
            if zipfile.is_zipfile(f):
                f.seek(0)
                with zipfile.ZipFile(f) as zf:
                    if any(n.split("/", 1)[-1] == "constants.pkl" for n in zf.namelist()):
                        raise PickleRefusedError(f"{name}: refused a TorchScript archive (torch.load would run it)")
            f.seek(0)
            with warnings.catch_warnings():
                # The legacy format compares a pickled module's source with its class; stand-ins have none.
                warnings.filterwarnings("ignore", message="Couldn't retrieve source code for container")
                return torch.load(f, map_location="cpu", pickle_module=_RESTRICTED_PICKLE, weights_only=False,
                                  mmap=False)
    except Exception as exc:  # every way bad bytes fail becomes one of the three documented types
        refusal = _refusal_in(exc)
        if refusal is not None:
            raise PickleRefusedError(_in_file(name, str(refusal))) from None
        if isinstance(exc, FileNotFoundError):  # removed since the stat
            raise
        raise TokenizerFileError(f"{name}: cannot read (truncated or corrupt, or not a torch.save file: "
                                 f"{_described(exc)})") from exc


def _modules_of(root: _StandIn) -> Dict[str, _StandIn]:
    """Flatten a pickled module tree: {dotted path: stand-in} ('' is the root). A pickle can share or
    nest objects any way it likes, so a module met twice is an error (and cannot recurse forever)."""
    out: Dict[str, _StandIn] = {}
    seen: set = set()
    todo: List[Tuple[str, _StandIn]] = [("", root)]
    while todo:
        path, standin = todo.pop()
        if id(standin) in seen:
            raise ValueError(f"pickled module {path}: the same module object appears twice in the tree")
        seen.add(id(standin))
        out[path] = standin
        children = standin.state.get("_modules", {})
        if not isinstance(children, Mapping):
            raise ValueError(f"pickled module {path or '<root>'}: _modules is a {type(children).__name__}")
        for name, child in children.items():
            child_path = f"{path}.{name}" if path else str(name)
            if not isinstance(child, _StandIn):
                raise ValueError(f"pickled module {child_path}: expected a module, got {type(child).__name__}")
            todo.append((child_path, child))
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-12)
    return a == b


def _expected_attrs(module: nn.Module) -> Dict[str, Any]:
    """Pickled attributes of the `dall_e` counterpart of `module` that change what it computes."""
    if isinstance(module, nn.Conv2d):
        return {"n_in": module.in_channels, "n_out": module.out_channels, "kw": module.kernel_size[0]}
    if isinstance(module, _DalleBlock):
        return {"n_in": module.n_in, "n_out": module.n_out, "post_gain": module.post_gain}
    if isinstance(module, nn.MaxPool2d):
        return {k: getattr(module, k) for k in ("kernel_size", "stride", "padding", "dilation", "ceil_mode")}
    if isinstance(module, nn.Upsample):
        return {"size": module.size, "scale_factor": module.scale_factor, "mode": module.mode}
    return {}


def _dalle_kind(module: nn.Module) -> str:
    name = getattr(type(module), "DALLE_NAME", None)
    return name if name is not None else _DALLE_KINDS[type(module)]


def _state_dict_from_standins(model: nn.Module, root: _StandIn) -> Dict[str, torch.Tensor]:
    """Check that the pickled tree is `model`'s architecture (module names, kinds, kernel sizes, gains,
    pooling) and return its parameters under our names (w -> weight, b -> bias)."""
    pickled = _modules_of(root)
    ours = dict(model.named_modules())
    missing, extra = sorted(set(ours) - set(pickled)), sorted(set(pickled) - set(ours))
    if missing or extra:
        raise ValueError(f"pickled module tree differs from the architecture: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    state: Dict[str, torch.Tensor] = {}
    for path, module in ours.items():
        standin = pickled[path]
        where = path or "<root>"
        if standin.QUALNAME != _dalle_kind(module):
            raise ValueError(f"pickled module {where} is a {standin.QUALNAME}, expected {_dalle_kind(module)}")
        for key, want in _expected_attrs(module).items():
            got = standin.state.get(key, "<missing>")
            if not _same(got, want):
                raise ValueError(f"pickled module {where}: {key}={got!r}, the architecture has {want!r}")
        for group in ("_parameters", "_buffers"):
            tensors = standin.state.get(group, {})
            if not isinstance(tensors, Mapping):
                raise ValueError(f"pickled module {where}: {group} is a {type(tensors).__name__}")
            for name, t in tensors.items():
                if t is None:
                    continue
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"pickled module {where}: {group}[{name!r}] is a {type(t).__name__}")
                key = {"w": "weight", "b": "bias"}.get(name, name)
                state[f"{path}.{key}" if path else key] = t.detach()
    return state


_CONFIG_KEYS = {
    DalleEncoder: ("group_count", "n_hid", "n_blk_per_group", "input_channels", "vocab_size"),
    DalleDecoder: ("group_count", "n_init", "n_hid", "n_blk_per_group", "output_channels", "vocab_size"),
}


def _config_from_standin(cls: type, root: _StandIn) -> Dict[str, int]:
    config = {}
    for key in _CONFIG_KEYS[cls]:
        # group_count is a plain class attribute of the package's attrs classes, not a field: it is
        # not in the pickled state and is always 4 there.
        v = root.state.get(key, 4 if key == "group_count" else None)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"pickled {root.QUALNAME}: hyper-parameter {key}={v!r} is not an int")
        config[key] = v
    if config["group_count"] != 4:  # the package always builds four groups
        raise ValueError(f"pickled {root.QUALNAME} has group_count={config['group_count']}: the dall_e package "
                         "hard-wires four groups, so only group_count=4 has our architecture")
    return config


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _normalise_keys(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our names; a `dall_e` state dict (`.w`, `.b`) is renamed."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"\.w$", ".weight", k)
        k = re.sub(r"\.b$", ".bias", k)
        out[k] = v.detach()
    return out


def _config_from_state_dict(cls: type, sd: Mapping[str, torch.Tensor]) -> Dict[str, int]:
    """Every hyper-parameter follows from the shapes: group count and blocks per group from the names,
    widths, channels and vocabulary from the input and output convs."""
    try:
        groups = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.group_(\d+)\.", k)] if m}
        blocks = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.group_1\.block_(\d+)\.", k)] if m}
        w_in, w_out = sd["blocks.input.weight"], sd["blocks.output.conv.weight"]
        if not groups or not blocks or w_in.dim() != 4 or w_out.dim() != 4:
            raise KeyError("blocks.group_1.block_1")
    except KeyError as exc:
        raise ValueError(f"not a {cls.__name__} state dict: no {exc.args[0]!r} entry") from None
    config = {"group_count": max(groups), "n_blk_per_group": max(blocks)}
    if cls is DalleEncoder:
        config.update(n_hid=w_in.shape[0], input_channels=w_in.shape[1], vocab_size=w_out.shape[0])
    else:
        config.update(n_init=w_in.shape[0], vocab_size=w_in.shape[1], n_hid=w_out.shape[1],
                      output_channels=w_out.shape[0] // 2)
    return config


_DVAE_FORMAT = "beit-fast dvae"  # train/train_tokenizer.py: {"format", "encoder", "decoder", "image_size", ...}


def _is_dvae(obj: Any) -> bool:
    return isinstance(obj, Mapping) and isinstance(obj.get("format"), str) and obj["format"] == _DVAE_FORMAT


def _build(cls: type, path: PathLike, obj: Any, part: str) -> nn.Module:
    """A loaded object (stand-in tree, state dict, or dvae checkpoint) -> `cls` with its weights.

    Whatever stops the build (a file of another kind, hyper-parameters or weights that do not fit; a pickle
    can hold any allowed object, so any exception) becomes a one-line TokenizerFileError naming the file."""
    name = _file_name(path)
    try:
        return _build_model(cls, obj, part)
    except ValueError as exc:
        raise TokenizerFileError(_in_file(name, str(exc))) from exc
    except Exception as exc:  # a pickle can hold any allowed object: any error means the file does not fit
        raise TokenizerFileError(f"{name}: does not hold a usable {cls.__name__} ({_described(exc)})") from exc


def _build_model(cls: type, obj: Any, part: str) -> nn.Module:
    if _is_dvae(obj):
        if part not in obj:
            raise ValueError(f"the {_DVAE_FORMAT} checkpoint has no {part!r} entry")
        obj = obj[part]
    # Built on the meta device first: the hyper-parameters come from the file, and nothing is allocated
    # until the file's own tensors are known to have exactly the shapes they imply.
    if isinstance(obj, _StandIn):
        if obj.QUALNAME != cls.DALLE_NAME:
            raise ValueError(f"holds a pickled {obj.QUALNAME}, expected a {cls.DALLE_NAME}")
        with torch.device("meta"):
            model = cls(**_config_from_standin(cls, obj))
        state = _state_dict_from_standins(model, obj)
    elif _is_state_dict(obj):
        state = _normalise_keys(obj)
        with torch.device("meta"):
            model = cls(**_config_from_state_dict(cls, state))
    else:
        raise ValueError(f"expected a pickled {cls.DALLE_NAME}, a {cls.__name__} state dict or a "
                         f"{_DVAE_FORMAT} checkpoint, got {type(obj).__name__}")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if want != got:
        missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
        wrong = [f"{k}: {got[k]} vs {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
        raise ValueError(f"weights do not fit {cls.__name__}: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}, wrong shapes (file vs model) {wrong[:4]}")
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(state[name])
    model.eval().requires_grad_(False)
    return model


def load_dalle_encoder(path: PathLike) -> DalleEncoder:
    """Read `encoder.pkl` (a torch.save'd `dall_e.encoder.Encoder`), a `DalleEncoder` state dict, or a
    `beit-fast dvae` checkpoint, without importing `dall_e` or running pickled code.

    Returns a frozen (eval, no grad) fp32 `DalleEncoder` on the CPU; its forward takes mapped pixels.
    Raises FileNotFoundError for a missing file, `PickleRefusedError` (a pickle.UnpicklingError) naming the file
    and any global outside the allow-list, and `TokenizerFileError` (a ValueError) for anything else: a file
    that cannot be read or holds another kind of object or weights that do not fit. Messages are one line."""
    return _build(DalleEncoder, path, _restricted_torch_load(path), "encoder")


def load_dalle_decoder(path: PathLike) -> DalleDecoder:
    """`load_dalle_encoder` for `decoder.pkl` (`dall_e.decoder.Decoder`) -> a frozen `DalleDecoder`."""
    return _build(DalleDecoder, path, _restricted_torch_load(path), "decoder")


# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# The fast inference path of the encoder (CUDA, bf16). The same arithmetic as `DalleEncoder.body`
# regrouped so that fewer full passes over the activations remain (at 112px and B=128 one pass
# over a group-1 activation moves 0.8 GB each way):
# - convs in channels_last with channels_last weights prepared once (no autocast casts per call);
#   the 3 input channels are padded with zero channels to 8 (zero weights: exact), so cuDNN's
#   tensor-core kernels, which want 16-byte channel rows, take the 7x7 input conv;
# - ReLUs 2-4 run in place on the conv outputs;
# - conv_4 is 1x1: in channels_last it is a GEMM over pixel rows, and `addmm_` into the identity
#   branch does the residual add in the GEMM epilogue (beta=1); the 1/n_layers**2 post-gain is
#   folded into conv_4's weights and bias (exact for the published 1/64: a power of two);
# - conv_4's bias: with a 1x1 id_path it joins the id conv's bias; with an identity id_path, conv_3
#   gets 8 extra output channels (zero weights; bias 1 on the first, 0 on the rest) that stay 1 after
#   ReLU, and conv_4's weight gets the bias as the matching row, so the bias rides in the GEMM (exact)
#   instead of costing one more pass over the residual stream.
# Left as separate passes: relu_1 (the block input is needed un-rectified by the id path), the
# max-pools, and the pixel map + cast of the input.
# The head's weights are fp16 whatever the body's dtype (the features are cast on load): on a
# tokenizer trained for 100 steps (CPU emulation, 9600 positions) the bf16 head's rounded weights
# flipped 2% of the tokens against fp32, the fp16 head 0.7% (all from the bf16 body); the tensor
# cores run fp16 as fast as bf16. fp16 features overflow beyond 65504 (DALL-E's are far below).


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) channels_last -> (B*h*w, C) pixel rows (a view when the layout is channels_last)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _from_rows(rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Pixel rows back to (B, C, h, w) channels_last with the spatial shape of `like`."""
    B, _, h, w = like.shape
    return rows.view(B, h, w, rows.shape[1]).permute(0, 3, 1, 2)


_FAST_DTYPES = (torch.bfloat16, torch.float16)
_ONES_CHANNELS = 8  # the bias channels appended to conv_3 (a multiple of 8 keeps channel rows 16-byte aligned)
_INPUT_CHANNEL_MULTIPLE = 8


class _FastEncoder:
    """Prepared weights (compute dtype, channels_last, gains and biases folded) of a `DalleEncoder` and the
    regrouped forward. Device-agnostic (the CPU runs it in fp32 for the tests); the tokenizer builds it on CUDA
    in bf16. `key` is the encoder parameters' (pointer, version) signature it was built from."""

    def __init__(self, encoder: "DalleEncoder", dtype: torch.dtype, device: Union[torch.device, str]) -> None:
        self.dtype, self.device = dtype, torch.device(device)
        self.key = _weights_key(encoder)
        cl = torch.channels_last

        def prep(t: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
            t = t.detach().to(device=self.device, dtype=dtype)
            return t.contiguous(memory_format=cl) if channels_last else t.contiguous()

        def f32(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=self.device, dtype=torch.float32)

        conv_in = encoder.blocks.input
        self.in_channels = conv_in.weight.shape[1]
        self.in_pad = -self.in_channels % _INPUT_CHANNEL_MULTIPLE
        w_in = F.pad(f32(conv_in.weight), (0, 0, 0, 0, 0, self.in_pad))
        self.steps: List[Tuple[str, Any]] = [("conv", (prep(w_in, True), prep(conv_in.bias), conv_in.padding))]
        for name, group in encoder.blocks.named_children():
            if name in ("input", "output"):
                continue
            for module in group.children():
                if isinstance(module, nn.MaxPool2d):
                    self.steps.append(("pool", None))
                else:
                    self.steps.append(("block", self._prepare_block(module, prep, f32)))
        head = encoder.head
        self.head_dtype = torch.float16 if dtype in _FAST_DTYPES else dtype
        self.head_weight = head.weight.detach().reshape(head.weight.shape[0], -1).to(self.device, self.head_dtype)
        self.head_bias = head.bias.detach().to(self.device, self.head_dtype)

    @staticmethod
    def _prepare_block(block: "_DalleBlock", prep, f32) -> Dict[str, Any]:
        rp = block.res_path
        c1, c2, c3, c4 = rp.conv_1, rp.conv_2, rp.conv_3, rp.conv_4
        if c4.kernel_size != (1, 1):
            raise ValueError(f"the fast encoder needs a 1x1 conv_4, got {c4.kernel_size}")
        gain = block.post_gain
        w4 = f32(c4.weight).reshape(c4.out_channels, -1) * gain  # (n_out, n_hid)
        b4 = f32(c4.bias) * gain
        w3, b3 = f32(c3.weight), f32(c3.bias)
        out: Dict[str, Any] = {}
        if isinstance(block.id_path, nn.Conv2d):
            out["id_w"] = prep(block.id_path.weight, True)
            out["id_b"] = prep(f32(block.id_path.bias) + b4)
        else:
            out["id_w"] = out["id_b"] = None
            w3 = torch.cat([w3, w3.new_zeros((_ONES_CHANNELS,) + w3.shape[1:])])
            b3 = torch.cat([b3, b3.new_zeros(_ONES_CHANNELS)])
            b3[c3.out_channels] = 1.0  # relu(0 . x + 1) = 1: the bias input of the conv_4 GEMM
            w4 = torch.cat([w4, b4[:, None], w4.new_zeros((w4.shape[0], _ONES_CHANNELS - 1))], dim=1)
        out["convs"] = [(prep(c.weight, True) if c is not c3 else prep(w3, True), prep(c.bias if c is not c3 else b3),
                         c.padding) for c in (c1, c2, c3)]
        out["w4t"] = prep(w4).t()  # (K, n_out) view of a row-major (n_out, K): cuBLAS takes it transposed
        return out

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """Input-channel-padded, compute-dtype, channels_last pixels -> features (B, C, h, w) before the ReLU."""
        for kind, p in self.steps:
            if kind == "conv":
                x = F.conv2d(x, p[0], p[1], padding=p[2])
            elif kind == "pool":
                x = F.max_pool2d(x, kernel_size=2)
            else:
                (w1, b1, p1), (w2, b2, p2), (w3, b3, p3) = p["convs"]
                h = F.conv2d(torch.relu(x), w1, b1, padding=p1).relu_()
                h = F.conv2d(h, w2, b2, padding=p2).relu_()
                h = F.conv2d(h, w3, b3, padding=p3).relu_()
                ident = x if p["id_w"] is None else F.conv2d(x, p["id_w"], p["id_b"])
                # In place on the identity branch (the block input or the fresh id conv output): the residual add
                # is the GEMM's beta=1 epilogue. The rows are a view for channels_last tensors; were they a copy,
                # the result is still the returned rows.
                x = _from_rows(_rows(ident).addmm_(_rows(h), p["w4t"]), ident)
        return x

    def input(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> mapped pixels in the compute dtype, channels_last, zero channels added."""
        B, C, H, W = images.shape
        x = torch.empty((B, C + self.in_pad, H, W), device=images.device, dtype=self.dtype,
                        memory_format=torch.channels_last)
        x[:, C:].zero_()
        x[:, :C] = map_pixels(images.float())
        return x

    def tokens(self, images: torch.Tensor, head: str) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> token ids (B, h*w); head "triton" (fused ReLU + GEMM + argmax kernel)
        or "torch" (ReLU, then the 1x1 conv as a cuBLAS GEMM with the bias in its epilogue, then torch.argmax);
        both compute the logits from `head_dtype` features and weights with fp32 accumulation."""
        features = self.body(self.input(images))
        B, _, h, w = features.shape
        if head == "triton":
            from beit_fast.kernels.tokenizer_head import tokenizer_head_argmax

            return tokenizer_head_argmax(features, self.head_weight, self.head_bias)  # casts features on load
        logits = torch.addmm(self.head_bias, torch.relu(_rows(features)).to(self.head_dtype), self.head_weight.t())
        return logits.argmax(1).view(B, h * w)


def _weights_key(module: nn.Module) -> Tuple[Tuple[int, int], ...]:
    """Changes when any parameter is replaced, moved or modified in place (load_state_dict, .to, copy_)."""
    return tuple((p.data_ptr(), p._version) for p in module.parameters())


class _cudnn_benchmark:
    """`torch.backends.cudnn.benchmark = True` inside, the caller's setting restored after."""

    def __enter__(self) -> None:
        self.before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True

    def __exit__(self, *exc: Any) -> None:
        torch.backends.cudnn.benchmark = self.before


_HEADS = ("auto", "triton", "torch")
_MAX_GRAPHS = 4  # captured batch shapes kept per tokenizer (each holds its activations' memory pool)


def _check_fast(fast: Union[bool, str]) -> None:
    if fast not in (True, False, "auto"):
        raise ValueError(f"fast={fast!r}: must be True, False or 'auto'")


class DalleTokenizer(VisualTokenizer):
    """DALL-E dVAE tokenizer: images (B, 3, S, S) in [0, 1] -> ids (B, (S/d)**2), argmax of the encoder logits.

    `fast` (house rule 4): False is the fp32 reference; "auto" takes the fast path when the images are
    on a CUDA device; True requires it and raises with the reasons where it cannot run. The fast path
    (`_FastEncoder`; not measured on any card yet) runs the body in `fast_dtype` channels_last convs
    (bf16; fp16 is closer to fp32 where the activations fit its range) with
    `torch.backends.cudnn.benchmark` on for the call (the caller's setting restored), the post-gains and
    conv_4 biases folded into weights and the residual adds in the conv_4 GEMMs. `head` picks its last
    step, which runs in fp16: "triton" (the fused ReLU + 1x1 conv + argmax kernel, logits never
    written, vocabulary split across programs), "torch" (cuBLAS GEMM + torch.argmax: writes the
    (B*h*w, vocab) logits), "auto" (triton where Triton runs, else torch). `cuda_graph`: the fast path
    is captured in a CUDA graph per (batch shape, dtype, device) on its first call (after a warm-up
    that lets cuDNN pick algorithms) and replayed after; the graph keeps its activations' memory pool
    (~2 GB at B=128, 112px, by our count of the live activations) while cached (up to 4 shapes).
    Weights are re-prepared when the encoder's parameters change (pointer or version). If a capture
    fails, the reason is kept in `graph_error` and the call runs eagerly from then on. The wrapped
    modules are frozen (eval, no grad). On a GPU the [0, 1] input check is deferred, not a sync: it is
    reported by the next `beit_fast.kernels.check_deferred()`.
    """

    def __init__(
        self,
        encoder: DalleEncoder,
        decoder: Optional[DalleDecoder] = None,
        image_size: int = 112,
        fast: Union[bool, str] = False,
        source: Optional[str] = None,
        head: str = "auto",
        cuda_graph: bool = True,
        fast_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        _check_fast(fast)
        if fast_dtype not in _FAST_DTYPES:
            raise ValueError(f"fast_dtype={fast_dtype}: must be torch.bfloat16 or torch.float16")
        if head not in _HEADS:
            raise ValueError(f"head={head!r}: must be one of {', '.join(map(repr, _HEADS))}")
        if image_size % encoder.downsample:
            raise ValueError(f"image_size {image_size} must be a multiple of the encoder's {encoder.downsample}x "
                             "downsampling")
        if encoder.input_channels != 3:
            raise ValueError(f"the encoder takes {encoder.input_channels} channels; a tokenizer takes RGB")
        if decoder is not None and (decoder.vocab_size != encoder.vocab_size or decoder.upsample != encoder.downsample):
            raise ValueError(f"decoder (vocab {decoder.vocab_size}, {decoder.upsample}x) does not match the encoder "
                             f"(vocab {encoder.vocab_size}, {encoder.downsample}x)")
        self.encoder, self.decoder = encoder, decoder
        self.requires_grad_(False).eval()
        self.fast, self.head, self.cuda_graph, self.fast_dtype = fast, head, bool(cuda_graph), fast_dtype
        self._fast_encoder: Optional[_FastEncoder] = None
        self._graphs: "OrderedDict[tuple, Tuple[Any, torch.Tensor, torch.Tensor]]" = OrderedDict()
        self.graph_error: Optional[str] = None
        self.vocab_size = encoder.vocab_size
        self.image_size = image_size
        self.grid_size = image_size // encoder.downsample
        self.description = (
            f"DALL-E dVAE tokenizer (n_hid {encoder.n_hid}, {encoder.group_count} groups x "
            f"{encoder.n_blk_per_group} blocks, vocab {encoder.vocab_size}, {image_size}px -> "
            f"{self.grid_size}x{self.grid_size}{', with decoder' if decoder is not None else ''}"
            f"{f'; from {source}' if source else ''})"
        )

    @classmethod
    def from_files(
        cls,
        encoder_path: PathLike,
        decoder_path: Optional[PathLike] = None,
        image_size: Optional[int] = None,
        fast: Union[bool, str] = False,
    ) -> "DalleTokenizer":
        """From `encoder.pkl` [+ `decoder.pkl`], state dicts, or one `beit-fast dvae` checkpoint (which
        carries the decoder and image size too). image_size defaults to the checkpoint's, else 14 codes a side.

        A file that cannot be loaded raises FileNotFoundError, `PickleRefusedError` or `TokenizerFileError`
        (see `load_dalle_encoder`); so do files that load but do not make a tokenizer together (a decoder that
        does not match the encoder, an image size the encoder cannot take)."""
        _check_fast(fast)
        obj = _restricted_torch_load(encoder_path)
        encoder = _build(DalleEncoder, encoder_path, obj, "encoder")
        decoder = None
        is_dvae = _is_dvae(obj)
        if decoder_path is not None:
            decoder = load_dalle_decoder(decoder_path)
        elif is_dvae and "decoder" in obj:
            decoder = _build(DalleDecoder, encoder_path, obj, "decoder")
        if image_size is None:
            size = obj.get("image_size") if is_dvae else None
            image_size = size if isinstance(size, int) and not isinstance(size, bool) else 14 * encoder.downsample
        source = _file_name(encoder_path) + (f" + {_file_name(decoder_path)}" if decoder_path is not None else "")
        try:
            return cls(encoder, decoder, image_size=image_size, fast=fast, source=source)
        except ValueError as exc:
            raise TokenizerFileError(_in_file(source, str(exc))) from exc

    def fast_reasons(self, device: Union[torch.device, str]) -> List[str]:
        """Why the fast path cannot run on `device` (empty: it can)."""
        device = torch.device(device)
        return [] if device.type == "cuda" else [f"the fast path needs a CUDA device, the images are on {device}"]

    def _use_fast(self, device: torch.device) -> bool:
        if self.fast is False:
            return False
        reasons = self.fast_reasons(device)
        if self.fast is True and reasons:
            raise RuntimeError("fast tokenization requested (fast=True) but cannot run: " + "; ".join(reasons))
        return not reasons

    def _logits_argmax(self, features: torch.Tensor) -> torch.Tensor:
        """argmax over the vocabulary of head(relu(features)): (B, C, h, w) -> (B, h*w) int64.

        Plain torch; the head runs in its own dtype (fp32, as the package runs its output conv)."""
        head = self.encoder.head
        return head(F.relu(features.to(head.weight.dtype))).argmax(1).flatten(1)

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """images float (B, 3, S, S) in [0, 1] -> LongTensor (B, grid * grid); `map_pixels` is applied here."""
        self.check_images(images)
        if not images.is_floating_point():
            raise ValueError(f"tokenizer expects float images in [0, 1], got {images.dtype}")
        from beit_fast.kernels import defer_check  # on a GPU the range check must not synchronise

        defer_check(~((images >= 0) & (images <= 1)).all(),
                    lambda: f"tokenizer expects pixels in [0, 1], got values in [{float(images.min()):.4g}, "
                            f"{float(images.max()):.4g}] (NaN: {bool(images.isnan().any())})")
        if self._use_fast(images.device):
            return self._fast_tokens(images)
        features = self.encoder.body(map_pixels(images.float()))
        return self._logits_argmax(features)

    def _head_kind(self, device: torch.device) -> str:
        from beit_fast.kernels import triton_reasons

        reasons = triton_reasons(device)
        if self.head == "triton" and reasons:
            raise RuntimeError("head='triton' requested but Triton cannot run: " + "; ".join(reasons))
        return "triton" if self.head == "triton" or (self.head == "auto" and not reasons) else "torch"

    def _fast_tokens(self, images: torch.Tensor) -> torch.Tensor:
        key = _weights_key(self.encoder)
        fe = self._fast_encoder
        if fe is None or fe.key != key or fe.device != images.device or fe.dtype != self.fast_dtype:
            self._graphs.clear()  # they replay the old weights
            fe = self._fast_encoder = _FastEncoder(self.encoder, self.fast_dtype, images.device)
        head = self._head_kind(images.device)
        # The fast path sets its own dtypes: a caller's autocast must not recast the prepared weights.
        with torch.autocast(images.device.type, enabled=False), _cudnn_benchmark():
            if not self.cuda_graph or self.graph_error is not None:
                return fe.tokens(images, head)
            gkey = (tuple(images.shape), images.dtype, images.device, head)
            entry = self._graphs.get(gkey)
            if entry is None:
                try:
                    entry = self._capture(fe, images, head)
                except Exception as exc:  # an uncapturable op on this stack: eager from now on, reason kept
                    self.graph_error = first_line(f"{type(exc).__name__}: {exc}")
                    warnings.warn(f"tokenizer: CUDA graph capture failed, running eagerly ({self.graph_error})",
                                  RuntimeWarning, stacklevel=3)
                    return fe.tokens(images, head)
                self._graphs[gkey] = entry
                while len(self._graphs) > _MAX_GRAPHS:
                    self._graphs.popitem(last=False)
            self._graphs.move_to_end(gkey)
            graph, static_in, static_out = entry
            static_in.copy_(images)
            graph.replay()
            return static_out.clone()  # the next replay overwrites static_out

    @staticmethod
    def _capture(fe: _FastEncoder, images: torch.Tensor, head: str) -> Tuple[Any, torch.Tensor, torch.Tensor]:
        """Warm up on a side stream (cuDNN benchmarks its algorithms, Triton compiles: neither may happen during
        capture), then capture one call reading `static_in`."""
        static_in = images.clone()
        side = torch.cuda.Stream(device=images.device)
        side.wait_stream(torch.cuda.current_stream(images.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fe.tokens(static_in, head)
        torch.cuda.current_stream(images.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = fe.tokens(static_in, head)
        return graph, static_in, static_out

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """LongTensor (B, grid * grid) -> images (B, 3, image_size, image_size) in [0, 1] (the decoder's means)."""
        if self.decoder is None:
            raise RuntimeError("this DalleTokenizer has no decoder: pass decoder_path to from_files (or a decoder)")
        g = self.grid_size
        if tokens.dim() != 2 or tokens.shape[1] != g * g or tokens.dtype != torch.long:
            raise ValueError(f"decode expects LongTensor (B, {g * g}), got {tokens.dtype} {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        w = self.decoder.blocks.input.weight
        z = F.one_hot(tokens.view(-1, g, g), self.vocab_size).permute(0, 3, 1, 2).to(w.dtype)
        return decoded_images(self.decoder(z))
