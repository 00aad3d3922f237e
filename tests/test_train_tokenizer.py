"""dVAE tokenizer training (beit-fast train-tokenizer), the token cache, and pretraining on a trained tokenizer."""

import csv

import pytest
import torch

from beit_fast.tokenizer import DalleDecoder, DalleEncoder, DalleTokenizer, map_pixels
from beit_fast.train.train_tokenizer import (
    TokenizerTrainConfig,
    config_from_args,
    decoded_images,
    tau_at,
    train_tokenizer,
)
from helpers import run_cli

TINY = dict(image_size=16, group_count=2, n_hid=16, n_init=16, n_blk_per_group=1, vocab_size=64, batch_size=8,
            num_images=64, log_every=10, usage_window=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    summary = train_tokenizer(TokenizerTrainConfig(**TINY, max_steps=150, out=str(out), lr=3e-3))
    return out, summary


def _column(path, name):
    with open(path) as f:
        return [float(r[name]) for r in csv.DictReader(f)]


def _recon_mse(enc, dec, images):
    with torch.no_grad():
        z = torch.softmax(enc(map_pixels(images)), dim=1)  # the relaxation without noise: deterministic
        return float(torch.nn.functional.mse_loss(decoded_images(dec(z)), images))


def test_training_lowers_the_loss_and_logs(trained):
    out, summary = trained
    assert len(_column(out / "metrics.csv", "recon_mse")) == 150
    # The same fixed images through the initial weights (same seed, same construction order) and the trained ones.
    ckpt = torch.load(out / "tokenizer.pt", weights_only=True)
    torch.manual_seed(0)
    enc0, dec0 = DalleEncoder(**ckpt["encoder_kwargs"]), DalleDecoder(**ckpt["decoder_kwargs"])
    enc1, dec1 = DalleEncoder(**ckpt["encoder_kwargs"]), DalleDecoder(**ckpt["decoder_kwargs"])
    enc1.load_state_dict(ckpt["encoder"])
    dec1.load_state_dict(ckpt["decoder"])
    from torchvision.transforms import functional as TF

    from beit_fast.data import BuiltinShapes

    ds = BuiltinShapes(16, 24, seed=7)
    images = torch.stack([TF.to_tensor(TF.center_crop(ds[i][0], 24).resize((16, 16))) for i in range(16)])
    before, after = _recon_mse(enc0, dec0, images), _recon_mse(enc1, dec1, images)
    assert after < 0.8 * before, (before, after)
    assert summary["perplexity"] > 1.5  # not collapsed onto one code
    assert (out / "reconstructions.png").stat().st_size > 0
    taus = _column(out / "metrics.csv", "tau")
    assert taus[0] == pytest.approx(1.0) and taus[-1] == pytest.approx(1 / 16)


def test_checkpoint_round_trips_into_a_tokenizer(trained):
    out, _ = trained
    ckpt = torch.load(out / "tokenizer.pt", weights_only=True)
    enc = DalleEncoder(**ckpt["encoder_kwargs"])
    enc.load_state_dict(ckpt["encoder"])
    tok = DalleTokenizer.from_files(out / "tokenizer.pt")
    assert (tok.image_size, tok.grid_size, tok.vocab_size) == (16, 8, 64)
    images = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        want = enc(map_pixels(images)).argmax(1).flatten(1)
    assert torch.equal(tok.tokenize(images), want)
    assert tok.decode(want).shape == (3, 3, 16, 16)


def test_tau_schedule_and_config_errors():
    cfg = TokenizerTrainConfig(max_steps=11)
    assert tau_at(0, cfg) == pytest.approx(1.0) and tau_at(10, cfg) == pytest.approx(1 / 16)
    assert config_from_args(["--preset", "dalle"]).vocab_size == 8192
    for bad in (["--nope=1"], ["--max-steps=x"], ["--preset=huge"], ["--image-size=30", "--group-count=3"],
                ["--recon=l1"]):
        with pytest.raises(ValueError):
            TokenizerTrainConfig.validate(config_from_args(bad))


def _cli(*args):
    return run_cli(*args)


def test_token_cache_and_pretraining_on_the_tokenizer(trained, tmp_path):
    out, _ = trained
    cache = tmp_path / "cache.pt"
    r = _cli("tokenize", "--tokenizer", str(out / "tokenizer.pt"), "--out", str(cache), "--num-images", "10")
    assert r.returncode == 0, r.stderr
    c = torch.load(cache, weights_only=True)
    assert c["tokens"].shape == (10, 64) and c["labels"].shape == (10,) and int(c["tokens"].max()) < 64
    # The tiny BEiT at img 32 / patch 4 has an 8x8 grid and a 64-token vocabulary: the tokenizer fits.
    r = _cli("pretrain", "--preset", "tiny", "--img-size=32", "--patch-size=4", "--vocab-size=64", "--depth=1",
             "--max-steps=2", "--batch-size=4", "--num-images=16", "--num-workers=0", "--out", str(tmp_path / "run"),
             "--tokenizer", str(out / "tokenizer.pt"))
    assert r.returncode == 0, r.stderr
    assert "DALL-E dVAE tokenizer" in r.stdout
    # A tokenizer whose vocabulary does not match the model's is refused up front, in one line.
    r = _cli("pretrain", "--preset", "tiny", "--img-size=32", "--patch-size=4", "--depth=1", "--max-steps=2",
             "--out", str(tmp_path / "bad"), "--tokenizer", str(out / "tokenizer.pt"))
    assert r.returncode == 2 and "vocab" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _cli("train-tokenizer", "--bogus=1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
