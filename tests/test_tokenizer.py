"""The DALL-E dVAE tokenizer: parity with the `dall_e` package (a test dependency), the restricted
loader (refuses foreign globals without running them; works with `dall_e` unimportable), our own
state dicts, and the `DalleTokenizer` interface. CPU, fp32, small widths."""

import contextlib
import copy
import json
import os
import pickle
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import run_cli

from beit_fast.tokenizer import (
    DalleDecoder,
    DalleEncoder,
    DalleTokenizer,
    PickleRefusedError,
    TokenizerFileError,
    decoded_images,
    load_dalle_decoder,
    load_dalle_encoder,
    map_pixels,
    unmap_pixels,
)

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs error relative to the reference's largest magnitude."""
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def dalle_modules(n_hid: int, n_blk: int, vocab: int, n_init: int = 128):
    """Random-weight `dall_e` Encoder and Decoder in fp32 on the CPU. The package rejects n_hid < 64 and
    vocab < 512 in its attrs validators; smaller models build with the validators switched off."""
    pytest.importorskip("dall_e")
    import attr
    from dall_e.decoder import Decoder
    from dall_e.encoder import Encoder

    kw = dict(n_hid=n_hid, n_blk_per_group=n_blk, vocab_size=vocab, requires_grad=False,
              use_mixed_precision=False, device=CPU)
    small = n_hid < 64 or vocab < 512
    with attr.validators.disabled() if small else contextlib.nullcontext():
        return Encoder(**kw), Decoder(n_init=n_init, **kw)


def _as_if_from_torch_1_7(module: nn.Module) -> nn.Module:
    """A copy whose pickled state lacks what later torch versions added (the published files predate them:
    their Upsample has no recompute_scale_factor, which is why they fail to run on torch >= 1.11)."""
    module = copy.deepcopy(module)
    newer = ("_backward_pre_hooks", "_is_full_backward_hook", "_forward_hooks_with_kwargs",
             "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs", "_state_dict_pre_hooks",
             "_load_state_dict_post_hooks", "_non_persistent_buffers_set", "recompute_scale_factor")
    for m in module.modules():
        for name in newer:
            m.__dict__.pop(name, None)
    return module


@contextlib.contextmanager
def dall_e_blocked(monkeypatch):
    """`import dall_e` (and its submodules) raises while inside."""
    with monkeypatch.context() as m:
        for name in [n for n in sys.modules if n == "dall_e" or n.startswith("dall_e.")]:
            m.setitem(sys.modules, name, None)
        m.setitem(sys.modules, "dall_e", None)
        yield


@pytest.mark.parametrize("n_hid,n_blk,vocab,n_init,size", [(64, 2, 512, 32, 32), (16, 1, 64, 8, 24)])
def test_parity_with_dall_e(tmp_path, monkeypatch, n_hid, n_blk, vocab, n_init, size):
    torch.manual_seed(n_hid + vocab)
    enc_ref, dec_ref = dalle_modules(n_hid, n_blk, vocab, n_init)
    with torch.no_grad():  # zero biases would hide a bias mix-up
        for p in list(enc_ref.parameters()) + list(dec_ref.parameters()):
            if p.dim() == 1:
                p.normal_(std=0.1)
    torch.save(enc_ref, tmp_path / "encoder.pkl")  # as the published files were made: the whole module
    torch.save(dec_ref, tmp_path / "decoder.pkl")
    torch.save(_as_if_from_torch_1_7(dec_ref), tmp_path / "decoder_old.pkl")
    with dall_e_blocked(monkeypatch):
        with pytest.raises(ImportError):
            import dall_e  # noqa: F401
        enc, dec = load_dalle_encoder(tmp_path / "encoder.pkl"), load_dalle_decoder(tmp_path / "decoder.pkl")
        tok = DalleTokenizer.from_files(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl", image_size=size)
        dec_old = load_dalle_decoder(tmp_path / "decoder_old.pkl")
    assert isinstance(enc, DalleEncoder) and isinstance(dec, DalleDecoder)
    assert (enc.n_hid, enc.n_blk_per_group, enc.vocab_size, enc.group_count) == (n_hid, n_blk, vocab, 4)
    assert (dec.n_init, dec.n_hid, dec.vocab_size, dec.output_channels) == (n_init, n_hid, vocab, 3)

    images = torch.rand(2, 3, size, size)
    x = map_pixels(images)
    with torch.no_grad():
        logits, logits_ref = enc(x), enc_ref(x)
        assert logits.shape == (2, vocab, size // 8, size // 8)
        assert rel_err(logits, logits_ref) <= 1e-5
        tokens_ref = logits_ref.argmax(1)
        assert torch.equal(logits.argmax(1), tokens_ref)
        assert torch.equal(tok.tokenize(images), tokens_ref.flatten(1))

        z = F.one_hot(tokens_ref, vocab).permute(0, 3, 1, 2).float()
        soft = torch.softmax(logits_ref, dim=1)  # soft codes, as in dVAE training
        for codes in (z, soft):
            out, out_ref = dec(codes), dec_ref(codes)
            assert out.shape == (2, 6, size, size)
            assert rel_err(out, out_ref) <= 1e-5
            assert rel_err(dec_old(codes), out_ref) <= 1e-5
        images_ref = unmap_pixels(torch.sigmoid(dec_ref(z)[:, :3]))
        assert rel_err(tok.decode(tokens_ref.flatten(1)), images_ref) <= 1e-5


def test_parity_published_size(tmp_path, monkeypatch):
    """The published hyper-parameters (n_hid 256, 2 blocks, vocab 8192; 53.8M encoder parameters) on a 16px image."""
    torch.manual_seed(0)
    enc_ref, dec_ref = dalle_modules(256, 2, 8192)
    torch.save(enc_ref, tmp_path / "encoder.pkl")
    torch.save(dec_ref, tmp_path / "decoder.pkl")
    with dall_e_blocked(monkeypatch):
        enc, dec = load_dalle_encoder(tmp_path / "encoder.pkl"), load_dalle_decoder(tmp_path / "decoder.pkl")
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in enc_ref.parameters())
    x = map_pixels(torch.rand(1, 3, 16, 16))
    with torch.no_grad():
        logits, logits_ref = enc(x), enc_ref(x)
        assert logits.shape == (1, 8192, 2, 2) and rel_err(logits, logits_ref) <= 1e-5
        assert torch.equal(logits.argmax(1), logits_ref.argmax(1))
        z = F.one_hot(logits_ref.argmax(1), 8192).permute(0, 3, 1, 2).float()
        assert rel_err(dec(z), dec_ref(z)) <= 1e-5


def test_module_names_match_dall_e():
    enc_ref, dec_ref = dalle_modules(16, 2, 64, 8)
    enc = DalleEncoder(n_hid=16, n_blk_per_group=2, vocab_size=64)
    dec = DalleDecoder(n_init=8, n_hid=16, n_blk_per_group=2, vocab_size=64)
    for ours, ref in ((enc, enc_ref), (dec, dec_ref)):
        want = {k[:-2] + (".weight" if k.endswith(".w") else ".bias"): v.shape for k, v in ref.state_dict().items()}
        assert {k: v.shape for k, v in ours.state_dict().items()} == want
        assert [n for n, _ in ours.named_modules()] == [n for n, _ in ref.named_modules()]
    assert enc.head is enc.blocks.output.conv and enc.head.kernel_size == (1, 1)
    x = torch.rand(2, 3, 32, 32)
    assert enc.body(x).shape == (2, 8 * 16, 4, 4)
    assert torch.equal(enc(x), enc.head(F.relu(enc.body(x))))


def test_loader_needs_no_dall_e_in_a_fresh_process(tmp_path):
    """A process that never imported `dall_e`, with the import blocked, loads the pickle and tokenizes."""
    torch.manual_seed(1)
    enc_ref, _ = dalle_modules(16, 1, 64, 8)
    torch.save(enc_ref, tmp_path / "encoder.pkl")
    images = torch.rand(2, 3, 16, 16)
    torch.save({"images": images, "tokens": enc_ref(map_pixels(images)).argmax(1).flatten(1)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["dall_e"] = None  # any import of the package now raises ImportError
        import torch
        from beit_fast.tokenizer import DalleTokenizer
        tok = DalleTokenizer.from_files({str(tmp_path / "encoder.pkl")!r}, image_size=16)
        io = torch.load({str(tmp_path / "io.pt")!r})
        loaded = sorted(n for n, m in sys.modules.items() if n.startswith("dall_e") and m is not None)
        print(json.dumps({{"same": torch.equal(tok.tokenize(io["images"]), io["tokens"]), "dall_e": loaded}}))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"same": True, "dall_e": []}


class _Payload:
    """Pickles as a call of `fn(*args)`: what a malicious checkpoint would contain."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _payloads(marker: Path):
    import builtins
    import importlib

    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.eval": _Payload(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "io.open": _Payload(builtins.open, str(marker), "w"),  # builtins.open is io.open
        "importlib.import_module": _Payload(importlib.import_module, "antigravity"),
        "torch.serialization.load": _Payload(torch.load, str(marker)),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.eval", "io.open", "importlib.import_module",
                                  "torch.serialization.load"])
@pytest.mark.parametrize("layout", ["alone", "inside_state_dict", "legacy_format", "plain_pickle"])
def test_refuses_globals_outside_the_allow_list(tmp_path, name, layout):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[name]
    path = tmp_path / "evil.pkl"
    if layout == "alone":
        torch.save(payload, path)
    elif layout == "inside_state_dict":
        sd = DalleEncoder(n_hid=8, n_blk_per_group=1, vocab_size=16).state_dict()
        sd["blocks.input.bias"] = payload
        torch.save(sd, path)
    elif layout == "legacy_format":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    module, _, fn = name.rpartition(".")
    module = {"os": "(os|posix)"}.get(module, module)
    for load in (load_dalle_encoder, load_dalle_decoder, DalleTokenizer.from_files):
        with pytest.raises(PickleRefusedError, match=rf"`{module}\.{fn}`") as info:
            load(path)
        assert str(info.value).startswith(f"{path}: refused to unpickle ") and "\n" not in str(info.value)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated; old files still exist
def test_refuses_torchscript_archives(tmp_path):
    torch.jit.save(torch.jit.script(nn.ReLU()), tmp_path / "scripted.pt")
    with pytest.raises(PickleRefusedError, match=f"^{re.escape(str(tmp_path / 'scripted.pt'))}: .*TorchScript"):
        load_dalle_encoder(tmp_path / "scripted.pt")


def test_own_state_dicts_and_checkpoints(tmp_path):
    torch.manual_seed(2)
    for group_count in (4, 3):
        enc = DalleEncoder(group_count=group_count, n_hid=8, n_blk_per_group=1, vocab_size=32)
        dec = DalleDecoder(group_count=group_count, n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32)
        torch.save(enc.state_dict(), tmp_path / "enc.pt")
        torch.save(dec.state_dict(), tmp_path / "dec.pt")
        enc2, dec2 = load_dalle_encoder(tmp_path / "enc.pt"), load_dalle_decoder(tmp_path / "dec.pt")
        assert (enc2.group_count, enc2.n_hid, enc2.vocab_size, enc2.downsample) == (group_count, 8, 32, enc.downsample)
        assert dec2.n_init == 8 and dec2.output_channels == 3
        x = torch.rand(2, 3, 16, 16)
        z = torch.softmax(torch.randn(2, 32, 4, 4), 1)
        with torch.no_grad():
            assert torch.equal(enc2(x), enc(x)) and torch.equal(dec2(z), dec(z))
        assert not any(p.requires_grad for p in enc2.parameters()) and not enc2.training

    # `dall_e`-style names (w, b) and the legacy (non-zip) format load too.
    torch.save({k[: -len(".weight")] + ".w" if k.endswith(".weight") else k[: -len(".bias")] + ".b": v
                for k, v in enc.state_dict().items()}, tmp_path / "wb.pt", _use_new_zipfile_serialization=False)
    with torch.no_grad():
        assert torch.equal(load_dalle_encoder(tmp_path / "wb.pt")(x), enc(x))

    # The `beit-fast dvae` checkpoint of train/train_tokenizer.py: encoder, decoder and image size in one file.
    ckpt = {"format": "beit-fast dvae", "encoder": enc.state_dict(), "decoder": dec.state_dict(),
            "encoder_kwargs": {"group_count": 3}, "image_size": 16, "config": {"lr": 2e-3, "device": "auto"}}
    torch.save(ckpt, tmp_path / "tokenizer.pt")
    tok = DalleTokenizer.from_files(tmp_path / "tokenizer.pt")
    assert (tok.image_size, tok.grid_size, tok.vocab_size) == (16, 4, 32) and tok.decoder is not None
    assert tok.decode(tok.tokenize(torch.rand(3, 3, 16, 16))).shape == (3, 3, 16, 16)


def test_wrong_files_raise_clear_errors(tmp_path):
    enc_ref, dec_ref = dalle_modules(16, 1, 64, 8)
    torch.save(dec_ref, tmp_path / "decoder.pkl")
    with pytest.raises(ValueError, match="dall_e.decoder.Decoder"):
        load_dalle_encoder(tmp_path / "decoder.pkl")
    enc_ref.vocab_size = 10**9  # hyper-parameters that contradict the weights: refused before any allocation
    torch.save(enc_ref, tmp_path / "lying.pkl")
    with pytest.raises(ValueError, match="blocks.output.conv: n_out=64, the architecture has 1000000000"):
        load_dalle_encoder(tmp_path / "lying.pkl")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="got list"):
        load_dalle_encoder(tmp_path / "list.pt")
    sd = DalleEncoder(n_hid=8, n_blk_per_group=1, vocab_size=16).state_dict()
    sd["blocks.group_1.block_1.res_path.conv_2.weight"] = torch.zeros(3, 3, 3, 3)
    torch.save(sd, tmp_path / "bad_shape.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_dalle_encoder(tmp_path / "bad_shape.pt")
    torch.save({"blocks.input.weight": torch.zeros(8, 3, 7, 7)}, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="DalleEncoder state dict"):
        load_dalle_encoder(tmp_path / "partial.pt")


def _tiny_dvae_checkpoint() -> dict:
    """A `beit-fast dvae` checkpoint (train_tokenizer.py's format) at the smallest widths: loads in milliseconds."""
    torch.manual_seed(4)
    enc = DalleEncoder(n_hid=8, n_blk_per_group=1, vocab_size=16)
    dec = DalleDecoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=16)
    return {"format": "beit-fast dvae", "encoder": enc.state_dict(), "decoder": dec.state_dict(), "image_size": 16}


def _bad_tokenizer_file(tmp_path: Path, kind: str) -> Path:
    """A tokenizer file of the given kind of badness (see BAD_FILES)."""
    path = tmp_path / f"{kind}.pt"
    if kind == "missing":
        pass
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind in ("truncated_zip", "truncated_legacy"):
        torch.save(_tiny_dvae_checkpoint(), path, _use_new_zipfile_serialization=kind == "truncated_zip")
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "directory":
        path.mkdir()
    elif kind == "under_a_file":
        (tmp_path / "file").write_bytes(b"x")
        path = tmp_path / "file" / "tok.pt"
    elif kind == "torch_saved_list":
        torch.save([1, 2, 3], path)
    elif kind == "pickled_list":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    elif kind == "wrong_shapes":
        ckpt = _tiny_dvae_checkpoint()
        for part in ("encoder", "decoder"):
            ckpt[part]["blocks.group_1.block_1.res_path.conv_2.weight"] = torch.zeros(3, 3, 3, 3)
        torch.save(ckpt, path)
    else:
        raise AssertionError(kind)
    return path


BAD_FILES = {  # kind -> (the exception type, what its message says)
    "missing": (FileNotFoundError, "No such file or directory"),
    "empty": (TokenizerFileError, r"not a tokenizer file: empty file$"),
    "random_bytes": (TokenizerFileError, r"cannot read \(truncated or corrupt, or not a torch.save file: Unpickling"),
    "truncated_zip": (TokenizerFileError, r"cannot read \(truncated or corrupt, or not a torch.save file: Runtime"),
    "truncated_legacy": (TokenizerFileError, r"cannot read \(truncated or corrupt, or not a torch.save file: "),
    "directory": (TokenizerFileError, "is a directory, not a tokenizer file$"),
    "under_a_file": (TokenizerFileError, r"cannot open \(NotADirectoryError: "),
    "torch_saved_list": (TokenizerFileError, "state dict or a beit-fast dvae checkpoint, got list$"),
    "pickled_list": (TokenizerFileError, r"not a torch.save file: RuntimeError: Invalid magic number"),
    "wrong_shapes": (TokenizerFileError, r"weights do not fit Dalle(En|De)coder: .*\(3, 3, 3, 3\) vs \(\d+, \d+, 3, 3"),
}


@pytest.mark.parametrize("loader", ["load_dalle_encoder", "load_dalle_decoder", "from_files", "from_files_decoder"])
@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_tokenizer_files_raise_one_line_errors(tmp_path, kind, loader):
    """Every way a tokenizer file can be bad is one documented exception type whose one-line message names the
    file (issue 10): no EOFError, RuntimeError, BadZipFile, IsADirectoryError... from the depths of torch.load."""
    good = tmp_path / "good.pt"
    torch.save(_tiny_dvae_checkpoint(), good)
    load = {
        "load_dalle_encoder": load_dalle_encoder,
        "load_dalle_decoder": load_dalle_decoder,
        "from_files": DalleTokenizer.from_files,
        "from_files_decoder": lambda p: DalleTokenizer.from_files(good, p),  # a good encoder, a bad decoder file
    }[loader]
    path = _bad_tokenizer_file(tmp_path, kind)
    want, says = BAD_FILES[kind]
    with pytest.raises(Exception) as info:
        load(path)
    message = str(info.value)
    assert type(info.value) is want, f"{type(info.value).__name__}: {message}"
    assert len(message.splitlines()) == 1 and message == message.strip(), message
    assert str(path) in message
    if want is TokenizerFileError:
        assert message.startswith(f"{path}: ")
    assert re.search(says, message), message


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_corrupt_tokenizer_files_raise_only_documented_errors(tmp_path, legacy):
    """Cut anywhere or with bytes overwritten anywhere, a real tokenizer file loads (the bytes hit were weights)
    or raises TokenizerFileError / PickleRefusedError (a corrupt name) in one line naming the file."""
    good = tmp_path / "good.pt"
    torch.save(_tiny_dvae_checkpoint(), good, _use_new_zipfile_serialization=not legacy)
    data = good.read_bytes()
    rng = random.Random(10 + legacy)
    variants = [data[:n] for n in rng.sample(range(1, len(data)), 16)]
    for _ in range(24):
        corrupt = bytearray(data)
        for _ in range(rng.choice([1, 8])):
            corrupt[rng.randrange(len(corrupt))] = rng.randrange(256)
        variants.append(bytes(corrupt))
    path = tmp_path / "tok.pt"
    failed = 0
    for variant in variants:
        path.write_bytes(variant)
        try:
            DalleTokenizer.from_files(path)
        except (TokenizerFileError, PickleRefusedError) as exc:
            failed += 1
            assert str(exc).startswith(f"{path}: ") and len(str(exc).splitlines()) == 1, str(exc)
    assert failed >= 16  # at least every truncated copy


def test_corrupt_memo_index_allocates_nothing(tmp_path):
    """A 9-byte pickle whose PUT names memo index 2**26: the C unpickler sizes its memo array by the index and
    zeroes it (1 GiB here; 32 GiB at 2**31: the OOM killer, not an exception). The restricted unpickler keeps
    its memo in a dict: the load fails as a bad file without the memory. Measured in a fresh process."""
    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x02]r" + (2**26).to_bytes(4, "little") + b".")  # PROTO 2, EMPTY_LIST, LONG_BINPUT, STOP
    script = textwrap.dedent(f"""
        import resource
        from beit_fast.tokenizer import TokenizerFileError, load_dalle_encoder
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_dalle_encoder({str(path)!r})
        except TokenizerFileError as exc:
            print(exc)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    message, grown_mib = res.stdout.strip().splitlines()
    assert message.startswith(f"{path}: cannot read") and "Invalid magic number" in message
    assert int(grown_mib) < 256, f"the load grew the process by {grown_mib} MiB"


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated_zip", "directory", "wrong_shapes", "refused_global"])
def test_cli_tokenize_bad_tokenizer_file_is_one_line(tmp_path, capsys, kind):
    """`beit-fast tokenize --tokenizer BAD`: exit 2, one line on stderr naming the file, nothing written."""
    from beit_fast.cli import main

    if kind == "refused_global":
        path = tmp_path / "evil.pt"
        torch.save(_Payload(os.system, f"touch {tmp_path / 'pwned'}"), path)
    else:
        path = _bad_tokenizer_file(tmp_path, kind)
    out = tmp_path / "x.pt"
    assert main(["tokenize", "--tokenizer", str(path), "--out", str(out), "--num-images", "4"]) == 2
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("beit-fast tokenize: error: "), captured.err
    assert str(path) in lines[0] and "Traceback" not in captured.err
    assert not out.exists() and not (tmp_path / "pwned").exists()


def test_cli_tokenize_truncated_tokenizer_file_in_a_shell(tmp_path):
    """The same as a user's shell runs it (a fresh process): a truncated legacy-format file is one line, exit 2."""
    path = _bad_tokenizer_file(tmp_path, "truncated_legacy")
    res = run_cli("tokenize", "--tokenizer", str(path), "--out", str(tmp_path / "x.pt"), "--num-images", "4",
                  timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines[0].startswith(f"beit-fast tokenize: error: {path}: cannot read (truncated or corrupt"), lines[0]


def test_files_that_do_not_make_a_tokenizer_together(tmp_path):
    ckpt = _tiny_dvae_checkpoint()
    torch.save(ckpt["encoder"], tmp_path / "enc.pt")
    torch.save(DalleDecoder(n_init=8, n_hid=8, n_blk_per_group=1, vocab_size=32).state_dict(), tmp_path / "dec.pt")
    with pytest.raises(TokenizerFileError, match=re.escape(f"{tmp_path / 'enc.pt'} + {tmp_path / 'dec.pt'}: decoder")):
        DalleTokenizer.from_files(tmp_path / "enc.pt", tmp_path / "dec.pt")
    with pytest.raises(TokenizerFileError, match="image_size 20 must be a multiple of the encoder's 8x"):
        DalleTokenizer.from_files(tmp_path / "enc.pt", image_size=20)
    with pytest.raises(ValueError, match="fast='yes'") as info:  # the caller's mistake: checked before any read
        DalleTokenizer.from_files(tmp_path / "missing.pt", fast="yes")
    assert type(info.value) is ValueError


def test_tokenize_and_decode():
    torch.manual_seed(3)
    enc = DalleEncoder(n_hid=16, n_blk_per_group=1, vocab_size=128)
    dec = DalleDecoder(n_init=16, n_hid=16, n_blk_per_group=1, vocab_size=128)
    tok = DalleTokenizer(enc, dec, image_size=32)
    assert (tok.vocab_size, tok.grid_size, tok.image_size) == (128, 4, 32)
    assert "DALL-E" in tok.description and "vocab 128" in tok.description
    assert not any(p.requires_grad for p in tok.parameters())
    images = torch.rand(3, 3, 32, 32)
    tokens = tok.tokenize(images)
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 128
    with torch.no_grad():
        ref = enc(map_pixels(images)).argmax(1).flatten(1)  # the pixel map is applied inside tokenize
        assert torch.equal(tokens, ref)
        assert torch.equal(tok._logits_argmax(enc.body(map_pixels(images))), ref)
    assert torch.equal(DalleTokenizer(enc, image_size=32, fast="auto").tokenize(images), tokens)  # CPU: reference
    with pytest.raises(RuntimeError, match="CUDA"):
        DalleTokenizer(enc, image_size=32, fast=True).tokenize(images)

    for bad in (images * 1.5, images - 0.5, images.masked_fill(images > 0.9, float("nan"))):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            tok.tokenize(bad)
    with pytest.raises(ValueError, match="float"):
        tok.tokenize((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tok.tokenize(torch.rand(3, 3, 24, 24))

    out = tok.decode(tokens)
    assert out.shape == (3, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1
    raw = dec(F.one_hot(tokens.view(3, 4, 4), 128).permute(0, 3, 1, 2).float())
    assert torch.equal(out, decoded_images(raw))
    with pytest.raises(ValueError, match="token ids"):
        tok.decode(tokens + 128)
    with pytest.raises(ValueError, match="LongTensor"):
        tok.decode(tokens[:, :5])
    with pytest.raises(RuntimeError, match="no decoder"):
        DalleTokenizer(enc, image_size=32).decode(tokens)
    with pytest.raises(ValueError, match="multiple"):
        DalleTokenizer(enc, image_size=36)


def test_pixel_maps():
    x = torch.rand(2, 3, 4, 4)
    assert torch.allclose(unmap_pixels(map_pixels(x)), x, atol=1e-6)
    out = torch.cat([torch.full((1, 3, 2, 2), 50.0), torch.zeros(1, 3, 2, 2)], 1)
    assert torch.equal(decoded_images(out), torch.ones(1, 3, 2, 2))  # clamped


# -- the fast inference path (CUDA; its arithmetic is checked here in fp32 on the CPU) ---------------------------------


@pytest.mark.parametrize("group_count,n_blk", [(4, 2), (3, 1)])  # post-gain 1/64 (a power of two) and 1/9
def test_fast_encoder_regrouping_matches_the_reference(group_count, n_blk):
    """`_FastEncoder` in fp32: post-gains folded into conv_4, conv_4's bias through the id conv's bias or the ones
    channel, residual adds as addmm_ into the identity branch, zero-padded input channels, both heads."""
    from beit_fast.tokenizer import _FastEncoder

    torch.manual_seed(group_count)
    enc = DalleEncoder(group_count=group_count, n_hid=16, n_blk_per_group=n_blk, vocab_size=96).eval()
    with torch.no_grad():  # zero biases would hide a bias folded into the wrong place
        for p in enc.parameters():
            if p.dim() == 1:
                p.normal_(std=0.1)
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        fe = _FastEncoder(enc, torch.float32, CPU)
        x = fe.input(images)
        assert x.shape == (3, 8, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
        got, want = fe.body(x), enc.body(map_pixels(images))
        assert got.shape == want.shape and rel_err(got, want) <= 1e-5
        tokens = enc(map_pixels(images)).argmax(1).flatten(1)
        for head in ("torch", "triton"):
            assert torch.equal(fe.tokens(images, head), tokens), head
    assert sum(kind == "block" for kind, _ in fe.steps) == group_count * n_blk
    assert not torch.equal(images, torch.zeros_like(images))  # the caller's images are not written


def test_fast_switches_are_checked():
    enc = DalleEncoder(n_hid=8, n_blk_per_group=1, vocab_size=16)
    with pytest.raises(ValueError, match="head='cudnn'"):
        DalleTokenizer(enc, image_size=16, head="cudnn")
    with pytest.raises(ValueError, match="fast_dtype"):
        DalleTokenizer(enc, image_size=16, fast_dtype=torch.float32)
    tok = DalleTokenizer(enc, image_size=16, fast="auto", head="torch", cuda_graph=False, fast_dtype=torch.float16)
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():  # on the CPU every switch leaves the fp32 reference as it was
        assert torch.equal(tok.tokenize(images), enc(map_pixels(images)).argmax(1).flatten(1))
    assert tok._fast_encoder is None and not tok._graphs


@pytest.fixture(scope="module")
def gpu_trained_tokenizer(tmp_path_factory):
    """A dVAE at the published layout (4 groups x 2 blocks: post-gain 1/64, identity and conv id paths), small
    widths, trained a few hundred steps on the GPU; images of the same distribution to tokenize."""
    from torchvision.transforms import functional as TF

    from beit_fast.data import BuiltinShapes
    from beit_fast.train.train_tokenizer import TokenizerTrainConfig, train_tokenizer

    out = tmp_path_factory.mktemp("tok_gpu")
    train_tokenizer(TokenizerTrainConfig(image_size=32, group_count=4, n_hid=32, n_init=32, n_blk_per_group=2,
                                         vocab_size=512, batch_size=32, num_images=512, max_steps=300, lr=3e-3,
                                         log_every=100, out=str(out), device="cuda"))
    ds = BuiltinShapes(512, 48, seed=7)
    images = torch.stack([TF.to_tensor(TF.center_crop(ds[i][0], 48).resize((32, 32))) for i in range(512)])
    return out / "tokenizer.pt", images


@pytest.mark.gpu
@pytest.mark.parametrize("fast_dtype", [torch.bfloat16, torch.float16])
def test_gpu_fast_path_agrees_with_fp32_on_a_trained_tokenizer(gpu_trained_tokenizer, fast_dtype):
    path, images = gpu_trained_tokenizer
    exact = DalleTokenizer.from_files(path).tokenize(images)  # fp32 on the CPU: no TF32 in the reference
    cuda_images = images.cuda()
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = False
    try:
        for head in ("triton", "torch"):
            for graph in (True, False):
                tok = DalleTokenizer.from_files(path, fast=True).cuda()
                tok.head, tok.cuda_graph, tok.fast_dtype = head, graph, fast_dtype
                halves = [tok.tokenize(cuda_images[:256]), tok.tokenize(cuda_images[256:])]  # a replay, new input
                again = tok.tokenize(cuda_images[:256])
                got = torch.cat(halves).cpu()
                agreement = float((got == exact).float().mean())
                assert agreement >= 0.99, (fast_dtype, head, graph, agreement)
                assert float((again.cpu() == got[:256]).float().mean()) >= 0.999, (head, graph)
                assert tok.graph_error is None and len(tok._graphs) == int(graph), tok.graph_error
                assert torch.backends.cudnn.benchmark is False
    finally:
        torch.backends.cudnn.benchmark = before


@pytest.mark.gpu
def test_gpu_fast_path_follows_weight_changes(gpu_trained_tokenizer):
    """A captured graph replays prepared weights: changing the encoder's weights in place re-prepares them."""
    path, images = gpu_trained_tokenizer
    tok = DalleTokenizer.from_files(path, fast=True).cuda()
    images = images[:64].cuda()
    first = tok.tokenize(images)
    with torch.no_grad():
        tok.encoder.head.bias[:] = -1e4
        tok.encoder.head.bias[7] = 1e4
    assert torch.equal(tok.tokenize(images), torch.full_like(first, 7))
