"""relaxkv_gen checkpoint loading: Self-Forcing layouts, and clear failures that leave the model untouched."""
import pytest
import torch
from safetensors.torch import save_file

from relaxkv_gen import build_model
from relaxkv_gen import get_preset
from relaxkv_gen import load_checkpoint
from relaxkv_gen.checkpoint import normalize_key
from relaxkv_gen.config import ModelConfig


@pytest.fixture(scope="module")
def tiny():
    return get_preset("tiny")


def _assert_same(model, sd):
    got = model.state_dict()
    assert got.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(got[k], v.to(got[k].dtype)), k


def test_self_forcing_layout_prefers_ema(tmp_path, tiny):
    ema = build_model(tiny, seed=11).state_dict()
    raw = build_model(tiny, seed=12).state_dict()
    path = tmp_path / "self_forcing.pt"
    torch.save({"generator": {"model." + k: v for k, v in raw.items()},
                "generator_ema": {"model." + k: v for k, v in ema.items()},
                "step": torch.tensor(1000)}, path)
    model = build_model(tiny, seed=13)
    info = load_checkpoint(model, path)
    assert info["source"] == "generator_ema" and info["num_tensors"] == len(ema)
    _assert_same(model, ema)


def test_generator_only_into_meta_model_in_bf16(tmp_path, tiny):
    raw = build_model(tiny, seed=21).state_dict()
    path = tmp_path / "gen.pth"
    torch.save({"generator": {"model." + k: v for k, v in raw.items()}}, path)
    model = build_model(tiny, dtype=torch.bfloat16, init=False)  # meta parameters, materialised by the loader
    info = load_checkpoint(model, path)
    assert info["source"] == "generator"
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in model.parameters())
    _assert_same(model, raw)


def test_safetensors_with_fsdp_wrappers(tmp_path, tiny):
    raw = build_model(tiny, seed=31).state_dict()

    def wrapped(k):  # FSDP wraps the root and every block
        if k.startswith("blocks."):
            i, rest = k.split(".", 2)[1:]
            return f"model._fsdp_wrapped_module.blocks.{i}._fsdp_wrapped_module.{rest}"
        return "model._fsdp_wrapped_module." + k

    path = tmp_path / "gen.safetensors"
    save_file({"generator_ema." + wrapped(k): v.contiguous() for k, v in raw.items()}, str(path))
    model = build_model(tiny, seed=32)
    assert load_checkpoint(model, path)["source"] == "generator_ema"
    _assert_same(model, raw)


def test_normalize_key():
    assert normalize_key("model._orig_mod.blocks.3._checkpoint_wrapped_module.ffn.0.weight") == "blocks.3.ffn.0.weight"
    assert normalize_key("head.modulation") == "head.modulation"


def _load_fails(model, path, *patterns):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        load_checkpoint(model, path)
    for p in patterns:
        assert p in str(err.value), str(err.value)
    _assert_same(model, before)  # nothing was loaded
    return str(err.value)


def test_other_architecture_is_rejected(tmp_path, tiny):
    other = ModelConfig(name="other", dim=96, num_heads=3, num_layers=3, ffn_dim=192, text_len=8,
                        latent_height=8, latent_width=8)
    path = tmp_path / "other.pt"
    torch.save({"generator_ema": {"model." + k: v for k, v in build_model(other, seed=1).state_dict().items()}}, path)
    msg = _load_fails(build_model(tiny, seed=2), path, "mis-shaped", "unexpected", "blocks.2.", "preset 'tiny'")
    assert "checkpoint [96" in msg and "\n" not in msg  # one line: the CLI prints it as its error line


def test_tiny_checkpoint_into_wan_preset_is_rejected(tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    torch.save(build_model(tiny, seed=3).state_dict(), path)
    with pytest.raises(ValueError, match=r"(?s)756 missing: .*68 mis-shaped: "
                                         r"blocks.0.cross_attn.k.bias \(checkpoint \[64\], model \[1536\]\)"):
        load_checkpoint(build_model(get_preset("wan-1.3b"), init=False), path)


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny):
    sd = {"model." + k: v for k, v in build_model(tiny, seed=4).state_dict().items()}
    del sd["model.head.modulation"]
    for i in range(12):
        sd[f"model.extra.{i}.weight"] = torch.randn(3)
    path = tmp_path / "broken.pt"
    torch.save(sd, path)
    _load_fails(build_model(tiny, seed=5), path, "1 missing: head.modulation", "12 unexpected", ", ...")


@pytest.mark.parametrize("name, content, pattern", [
    ("gen.bin", None, "unsupported extension"),
    ("gen.pt", "list", "expected a dict"),
    ("gen.pt", "garbage", "not a readable PyTorch/safetensors file"),
    ("gen.safetensors", "garbage", "not a readable PyTorch/safetensors file"),
], ids=["extension", "not-a-dict", "corrupt-pt", "corrupt-safetensors"])
def test_unreadable_files(tmp_path, tiny, name, content, pattern):
    path = tmp_path / name
    if content == "list":
        torch.save([torch.randn(2)], path)
    else:
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=pattern):
        load_checkpoint(build_model(tiny), path)


def test_missing_file(tmp_path, tiny):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(build_model(tiny), tmp_path / "nope.pt")
