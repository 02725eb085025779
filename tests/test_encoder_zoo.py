"""The named encoder zoo: every architecture on the meta device (no memory, no download), a small
configuration of each family through the same pooling code, local weights files in the hub's key
names, the hub's failures said fast (network faked, never used), and the dtype each runs in."""

from __future__ import annotations

import dataclasses
import importlib.util
import pickle

import httpx2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from safetensors.torch import save_file
from torch import nn

from hdmil.cli import main
from hdmil.errors import HDMILError
from hdmil.features import create_encoder, list_encoders, save_encoder, zoo
from hdmil.features.encoders import _REGISTRY, Encoder
from hdmil.features.recipe import TRIDENT_ENCODERS

# Facts from the model cards / TRIDENT: ViT depth, width, patch, register tokens, class token
# inside the position embedding or not, and the published parameter count (where the card gives one).
VITS = {
    "uni": (24, 1024, 16, 0, True, 303e6),
    "uni2-h": (24, 1536, 14, 8, False, 681e6),
    "virchow": (32, 1280, 14, 0, True, 632e6),
    "virchow2": (32, 1280, 14, 4, True, 632e6),
    "h-optimus-0": (40, 1536, 14, 4, False, 1.1e9),
    "h-optimus-1": (40, 1536, 14, 4, False, 1.1e9),
    "gigapath": (40, 1536, 16, 0, True, 1.13e9),
}
SWIGLU = {"uni2-h", "virchow", "virchow2", "h-optimus-0", "h-optimus-1", "gigapath"}
ISSUE_NAMES = {"resnet50_trunc", "uni", "uni2-h", "virchow", "virchow2", "h-optimus-0", "h-optimus-1",
               "gigapath", "phikon-v2", "conch-v1.5"}


HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="phikon-v2 needs the [encoders] extra")
BUILDABLE = sorted(n for n, s in zoo.ZOO.items() if HAS_TRANSFORMERS or s.family != "transformers")


@pytest.fixture(scope="module")
def metas() -> dict[str, nn.Module]:
    return {name: zoo.meta_reference(zoo.ZOO[name]) for name in BUILDABLE}


def _x(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- every architecture, full size, on the meta device ----------------------------------------------


def test_the_zoo_names_what_the_issue_asks_and_agrees_with_tridents_table():
    assert ISSUE_NAMES <= set(zoo.ZOO) and ISSUE_NAMES <= set(list_encoders())
    for ours, hub in TRIDENT_ENCODERS.values():  # the names TRIDENT's files map onto
        assert zoo.ZOO[ours].repo == hub.split(":", 1)[-1]


@pytest.mark.parametrize("name", BUILDABLE)
def test_meta_build_has_the_width_and_nothing_in_memory(metas, name):
    spec, model = zoo.ZOO[name], metas[name]
    assert all(t.is_meta for t in model.state_dict().values())
    out = model(torch.empty(2, 3, spec.input_size, spec.input_size, device="meta"))
    assert tuple(out.shape) == (2, spec.dim)


@pytest.mark.parametrize("name", sorted(VITS))
def test_timm_vits_have_their_model_cards_keys_and_sizes(metas, name):
    depth, width, patch, regs, cls_in_pos, published = VITS[name]
    state = metas[name].hub_module().state_dict()
    top = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
           "norm.bias"} | ({"reg_token"} if regs else set())
    assert {k for k in state if not k.startswith("blocks.")} == top
    assert len(state) == len(top) + 14 * depth  # norm1/2, qkv, proj, fc1, fc2 (w, b), ls1, ls2
    assert f"blocks.{depth - 1}.ls2.gamma" in state and f"blocks.{depth}.norm1.weight" not in state
    grid = (224 // patch) ** 2
    assert tuple(state["pos_embed"].shape) == (1, grid + (1 + regs if cls_in_pos else 0), width)
    assert tuple(state["patch_embed.proj.weight"].shape) == (width, 3, patch, patch)
    hidden = state["blocks.0.mlp.fc2.weight"].shape[1]
    assert state["blocks.0.mlp.fc1.weight"].shape[0] == hidden * (2 if name in SWIGLU else 1)
    params = sum(t.numel() for t in state.values())
    assert abs(params - published) / published < (0.04 if published >= 1e9 else 0.005)


@needs_transformers
def test_phikon_v2_is_a_dinov2_vit_l16(metas):
    state = metas["phikon-v2"].hub_module().state_dict()
    assert tuple(state["embeddings.position_embeddings"].shape) == (1, 1 + 14 * 14, 1024)
    assert tuple(state["embeddings.patch_embeddings.projection.weight"].shape) == (1024, 3, 16, 16)
    assert {"embeddings.cls_token", "embeddings.mask_token", "layernorm.weight"} <= set(state)
    layer0 = [k for k in state if k.startswith("encoder.layer.0.")]
    assert len(state) == 5 + 24 * len(layer0) + 2 and "encoder.layer.24.norm1.weight" not in state


def test_conch_v15_keys_are_those_of_its_vision_file(metas):
    state = metas["conch-v1.5"].state_dict()
    trunk = [k for k in state if k.startswith("trunk.")]
    assert len(trunk) == 6 + 14 * 24 and tuple(state["trunk.pos_embed"].shape) == (1, 197, 1024)
    assert tuple(state["trunk.blocks.0.ls1.gamma"].shape) == (1024,)
    pooler = {k: tuple(v.shape) for k, v in state.items() if not k.startswith("trunk.")}
    assert pooler == {
        "attn_pool_contrast.query": (1, 768), "attn_pool_contrast.ln_q.weight": (768,),
        "attn_pool_contrast.ln_q.bias": (768,), "attn_pool_contrast.ln_k.weight": (1024,),
        "attn_pool_contrast.ln_k.bias": (1024,), "attn_pool_contrast.to_q.weight": (768, 768),
        "attn_pool_contrast.to_kv.weight": (1536, 1024), "attn_pool_contrast.to_out.weight": (768, 768),
        "ln_contrast.weight": (768,), "ln_contrast.bias": (768,),
    }


def test_resnet50_trunc_spec_describes_the_registered_encoder(metas):
    keys = metas["resnet50_trunc"].state_dict()
    assert not any(k.startswith(("layer4.", "fc.")) for k in keys) and "layer3.5.bn3.weight" in keys
    assert zoo.ZOO["resnet50_trunc"].family == "registered"  # built as before: numbers unchanged


def test_hdmil_encoders_lists_every_name(metas, capsys):  # metas: the networks built once
    assert main(["encoders"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "dim", "input"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == set(zoo.ZOO)
    assert rows["virchow2"].split()[1:4] == ["2560", "224", "631.2"]
    assert "256→224" in rows["gigapath"] and "MahmoodLab/UNI2-h" in rows["uni2-h"]
    assert "bfloat16" in rows["uni2-h"] and "gated" in rows["uni"]


# -- small configurations: the same pooling code, run for real on the CPU --------------------------

SMALL = {"embed_dim": 32, "depth": 1, "num_heads": 2}


def _small(name: str, **extra) -> nn.Module:
    spec = zoo.ZOO[name]
    size = 28 if spec.kwargs.get("patch_size", 14) == 14 else 32
    return zoo.build_model(spec, **SMALL, img_size=size, **extra).eval(), size


@pytest.mark.parametrize("name", ["uni", "uni2-h", "h-optimus-0", "gigapath"])
def test_class_token_encoders_give_the_normed_class_token(name):
    model, size = _small(name)
    x = _x(2, size)
    with torch.inference_mode():
        tokens = model.trunk.forward_features(x)
        out = model(x)
    regs = zoo.ZOO[name].kwargs.get("reg_tokens", 4 if "optimus" in name else 0)
    assert tokens.shape[1] == 1 + regs + (size // model.trunk.patch_embed.patch_size[0]) ** 2
    torch.testing.assert_close(out, tokens[:, 0])


@pytest.mark.parametrize("name, registers", [("virchow", 0), ("virchow2", 4)])
def test_virchow_concatenates_class_token_and_mean_of_patch_tokens(name, registers):
    model, size = _small(name)
    x = _x(3, size)
    with torch.inference_mode():
        tokens = model.trunk.forward_features(x)  # [B, 1 + registers + 4, 32]
        out = model(x)
    assert tokens.shape[1] == 1 + registers + 4 and out.shape == (3, 64)
    by_hand = torch.cat([tokens[:, 0], tokens[:, 1 + registers:].mean(dim=1)], dim=1)
    torch.testing.assert_close(out, by_hand)
    if registers:  # the register tokens are really left out
        assert not torch.allclose(out[:, 32:], tokens[:, 1:].mean(dim=1))


@needs_transformers
def test_phikon_v2_gives_the_class_token_of_the_last_hidden_state():
    spec = zoo.ZOO["phikon-v2"]
    model = zoo.build_model(spec, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=32).eval()
    x = _x(2, 32)
    with torch.inference_mode():
        hidden = model.trunk(pixel_values=x).last_hidden_state
        out = model(x)
    assert hidden.shape == (2, 5, 32)
    torch.testing.assert_close(out, hidden[:, 0])


def test_conch_pooler_and_position_resize_by_hand():
    spec = zoo.ZOO["conch-v1.5"]
    torch.manual_seed(0)
    model = zoo.build_model(spec, embed_dim=32, depth=1, num_heads=2, img_size=32, pool_dim=16,
                            pool_heads=2).eval()
    x = _x(2, 64)  # a 4x4 grid on a trunk made for 2x2: the position embedding is resized
    t, pool = model.trunk, model.attn_pool_contrast
    with torch.inference_mode():
        patch_pos = t.pos_embed[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, scale_factor=(4.1 / 2, 4.1 / 2), mode="bicubic")
        pos = torch.cat([t.pos_embed[:, :1], patch_pos.flatten(2).transpose(1, 2)], dim=1)
        tokens = torch.cat([t.cls_token.expand(2, -1, -1), t.patch_embed.proj(x).flatten(2).transpose(1, 2)], 1)
        tokens = t.norm(t.blocks(tokens + pos))
        q = pool.to_q(pool.ln_q(pool.query)).reshape(1, 2, 8)  # [Q, heads, d]
        k, v = pool.to_kv(pool.ln_k(tokens)).reshape(2, 17, 2, 2, 8).unbind(2)  # [B, N, heads, d]
        attn = torch.einsum("qhd,bnhd->bhqn", q, k).mul(8 ** -0.5).softmax(dim=-1)
        pooled = pool.to_out(torch.einsum("bhqn,bnhd->bqhd", attn, v).reshape(2, 1, 16))[:, 0]
        torch.testing.assert_close(model(x), model.ln_contrast(pooled))
        assert model.position_embedding((2, 2)) is t.pos_embed  # the native grid: as it is


def test_zoo_encoders_resize_and_crop_as_their_cards_say():
    flat = nn.Flatten()
    giga = Encoder(flat, "crop", input_size=224, resize=256, interpolation="bicubic", device="cpu",
                   dim=3 * 224 * 224, channels_last=False)
    patches = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    x = torch.from_numpy(patches).permute(0, 3, 1, 2).float()
    mean, std = torch.tensor(giga.mean).view(1, 3, 1, 1), torch.tensor(giga.std).view(1, 3, 1, 1)
    crop = x[..., 16:240, 16:240]  # a 256 px patch is centre-cropped, not resized
    torch.testing.assert_close(giga.embed(patches), ((crop / 255 - mean) / std).flatten(1), rtol=1e-5, atol=1e-5)
    big = np.random.default_rng(1).integers(0, 256, (1, 300, 300, 3), dtype=np.uint8)
    xb = torch.from_numpy(big).permute(0, 3, 1, 2).float()
    resized = F.interpolate(xb, size=(256, 256), mode="bicubic", antialias=True).clamp(0, 255)
    expected = ((resized[..., 16:240, 16:240] / 255 - mean) / std).flatten(1)
    torch.testing.assert_close(giga.embed(big), expected, rtol=1e-4, atol=1e-4)


# -- weights: local files in the hub's format, and the hub itself (faked) ---------------------------

TINY_KW = {**zoo.ZOO["virchow2"].kwargs, **SMALL, "img_size": 28}


@pytest.fixture
def tiny(monkeypatch):
    """A small Virchow2 as a named zoo encoder (same family, pooling and registers)."""
    spec = dataclasses.replace(zoo.ZOO["virchow2"], name="tiny-virchow2", kwargs=TINY_KW, dim=64,
                               input_size=28, repo="test/tiny-virchow2")
    monkeypatch.setitem(zoo.ZOO, spec.name, spec)
    monkeypatch.setitem(_REGISTRY, spec.name,
                        lambda pretrained=False, device=None: zoo.build_encoder(spec, pretrained, device))
    torch.manual_seed(1)
    reference = zoo.build_model(spec).eval()  # weights unlike the seeded default
    return spec, reference


def _hub_state(reference: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in reference.trunk.state_dict().items()}  # the hub's key names


def _same(encoder, reference, size: int = 28) -> None:
    x = _x(2, size, seed=3)
    with torch.inference_mode():
        torch.testing.assert_close(encoder(x), reference(x))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_local_weights_file_in_hub_key_names_loads_strictly(tmp_path, tiny, fmt):
    spec, reference = tiny
    path = tmp_path / f"pytorch_model.{fmt}"
    state = _hub_state(reference)
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    enc = create_encoder(spec.name, weights=path, device="cpu")
    assert enc.weights == str(path) and enc.dim == 64 and enc.autocast_dtype is None
    _same(enc, reference)
    again = create_encoder(save_encoder(enc, tmp_path / "ours.safetensors"), device="cpu")  # arch in metadata
    _same(again, reference)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        assert set(f.keys()) == set(state)  # our files keep the hub's key names too


def test_a_file_with_other_keys_or_shapes_is_refused_naming_it(tmp_path, tiny):
    spec, reference = tiny
    state = _hub_state(reference)
    renamed = {("blocks.0.attn.qkv_wrong.weight" if k == "blocks.0.attn.qkv.weight" else k): v
               for k, v in state.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    with pytest.raises(HDMILError, match=r"renamed\.safetensors.*tiny-virchow2.*1 missing: blocks\.0\.attn\.qkv"
                                          r"\.weight.*1 unexpected"):
        create_encoder(spec.name, weights=tmp_path / "renamed.safetensors", device="cpu")
    torch.save({**state, "reg_token": torch.zeros(1, 2, 32)}, tmp_path / "shape.bin")
    with pytest.raises(HDMILError, match=r"shape\.bin.*wrong shape: reg_token"):
        create_encoder(spec.name, weights=tmp_path / "shape.bin", device="cpu")


class _Boom:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('BOOM').write_text('ran')",))


def test_a_file_that_would_run_code_is_refused_without_running_it(tmp_path, tiny, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.bin", "wb") as f:
        pickle.dump({"cls_token": _Boom()}, f, protocol=2)
    with pytest.raises(HDMILError, match="evil.bin"):
        create_encoder(tiny[0].name, weights=tmp_path / "evil.bin", device="cpu")
    assert not (tmp_path / "BOOM").exists()


@needs_transformers
def test_phikon_file_in_the_older_transformers_layout_loads(tmp_path):
    spec = dataclasses.replace(zoo.ZOO["phikon-v2"], kwargs={"hidden_size": 32, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "image_size": 32,
                               "patch_size": 16}, dim=32, input_size=32)
    reference = zoo.build_model(spec).eval()
    older = {k.replace("attention.q_proj", "attention.attention.query")
              .replace("attention.k_proj", "attention.attention.key")
              .replace("attention.v_proj", "attention.attention.value")
              .replace("attention.o_proj", "attention.output.dense"): v
             for k, v in reference.trunk.state_dict().items()}
    enc = zoo.encoder_from_state(spec, older, tmp_path / "model.safetensors", device="cpu")
    _same(enc, reference, size=32)


def test_conch_file_with_another_position_grid_is_resampled_bilinear(tmp_path):
    from timm.layers import resample_abs_pos_embed

    spec = dataclasses.replace(zoo.ZOO["conch-v1.5"], kwargs={**zoo.ZOO["conch-v1.5"].kwargs, **SMALL,
                               "img_size": 32, "pool_dim": 16, "pool_heads": 2}, dim=16, input_size=64)
    reference = zoo.build_model(spec).eval()
    state = dict(reference.state_dict())
    state["trunk.pos_embed"] = torch.randn(1, 1 + 9, 32)  # a 3x3 grid in the file, 2x2 in the trunk
    enc = zoo.encoder_from_state(spec, state, tmp_path / "pytorch_model_vision.bin", device="cpu")
    expected = resample_abs_pos_embed(state["trunk.pos_embed"], [2, 2], num_prefix_tokens=1,
                                      interpolation="bilinear", antialias=False)
    torch.testing.assert_close(enc.model.trunk.pos_embed.detach(), expected)


def _fake_hub(monkeypatch, cache, metadata=None):
    """The hub's two calls faked: no request leaves this process."""
    import huggingface_hub as hub

    calls = {"metadata": [], "download": []}

    def get_metadata(url, timeout=None, **kw):
        calls["metadata"].append((url, timeout))
        failure = metadata.get(url.rsplit("/", 1)[-1]) if isinstance(metadata, dict) else metadata
        if isinstance(failure, Exception):
            raise failure
        return object()

    def download(repo, filename, **kw):
        calls["download"].append((repo, filename, kw))
        if cache is None:
            raise AssertionError("hf_hub_download (which retries) must not be reached")
        return str(cache)

    monkeypatch.setattr(hub, "get_hf_file_metadata", get_metadata)
    monkeypatch.setattr(hub, "hf_hub_download", download)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache.parent if cache else "/nonexistent-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    return calls


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("HEAD", "https://huggingface.co/x/resolve/main/f"))


def test_unreachable_hub_is_one_short_request_and_names_the_model_page(monkeypatch):
    calls = _fake_hub(monkeypatch, None, httpx2.ConnectError("Name or service not known"))
    page = r"https://huggingface\.co/MahmoodLab/uni"
    with pytest.raises(HDMILError, match=rf"'uni'.*cannot be reached.*{page}.*--weights"):
        create_encoder("uni", pretrained=True, device="cpu")
    assert len(calls["metadata"]) == 1 and calls["metadata"][0][1] <= 10  # no retries, a short timeout
    assert "MahmoodLab/uni" in calls["metadata"][0][0] and not calls["download"]


def test_gated_model_without_a_token_says_how_to_get_access(monkeypatch):
    calls = _fake_hub(monkeypatch, None, hub_errors.GatedRepoError("Access restricted", response=_response(401)))
    with pytest.raises(HDMILError, match=r"'virchow2' is gated: accept its terms at "
                                          r"https://huggingface\.co/paige-ai/Virchow2.*no hub token"):
        create_encoder("virchow2", pretrained=True, device="cpu")
    assert len(calls["metadata"]) == 1


def test_offline_mode_is_said_at_once_without_asking_the_hub(monkeypatch):
    calls = _fake_hub(monkeypatch, None, AssertionError("offline: the hub must not be asked"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HDMILError, match=r"HF_HUB_OFFLINE.*https://huggingface\.co/bioptimus/H-optimus-0"):
        create_encoder("h-optimus-0", pretrained=True, device="cpu")
    assert not calls["metadata"] and not calls["download"]


def test_pretrained_downloads_the_hub_file_and_loads_it_strictly(tmp_path, tiny, monkeypatch):
    spec, reference = tiny
    weights = tmp_path / "model.safetensors"
    save_file(_hub_state(reference), str(weights))
    calls = _fake_hub(monkeypatch, weights)
    enc = create_encoder(spec.name, pretrained=True, device="cpu")
    assert enc.weights == "pretrained" and enc.hub_id == "hf-hub:test/tiny-virchow2"
    _same(enc, reference)
    (repo, filename, kw), = calls["download"]
    assert (repo, filename) == ("test/tiny-virchow2", "model.safetensors") and kw["etag_timeout"] <= 10


def test_unreachable_hub_uses_the_cached_weights(tmp_path, tiny, monkeypatch):
    spec, reference = tiny
    weights = tmp_path / "model.safetensors"
    save_file(_hub_state(reference), str(weights))
    _fake_hub(monkeypatch, None, httpx2.ConnectError("down"))
    monkeypatch.setattr(zoo, "_cached", lambda s: {"model.safetensors": str(weights)})
    _same(create_encoder(spec.name, pretrained=True, device="cpu"), reference)


# -- dtype ------------------------------------------------------------------------------------------


def test_each_encoder_runs_in_its_documented_dtype_on_cuda_and_float32_on_the_cpu():
    pick = zoo.preferred_dtype
    assert pick("uni", "cuda") == torch.float16 and pick("uni2-h", "cuda:0") == torch.bfloat16
    assert pick("virchow2", torch.device("cuda")) == torch.float16 and pick("conch-v1.5", "cuda") == torch.float16
    assert pick("phikon-v2", "cuda") is None and pick("resnet50_trunc", "cuda") is None  # float32
    assert all(pick(name, "cpu") is None for name in zoo.ZOO)
    assert pick("uni", "cpu", "bfloat16") == torch.bfloat16 and pick("uni2-h", "cuda", "float32") is None
    assert pick("resnet18_trunc", "cuda", fallback=torch.bfloat16) == torch.bfloat16  # not ours to change
    with pytest.raises(HDMILError, match="int8"):
        pick("uni", "cuda", "int8")


def test_create_encoder_sets_the_chosen_dtype(tiny):
    spec, _ = tiny
    assert create_encoder(spec.name, device="cpu").autocast_dtype is None
    assert create_encoder(spec.name, device="cpu", dtype="bfloat16").autocast_dtype == torch.bfloat16


def test_a_bare_file_is_matched_to_the_zoo_architecture_it_fits(tmp_path, tiny, monkeypatch):
    spec, reference = tiny
    torch.save(_hub_state(reference), tmp_path / "pytorch_model.bin")  # no metadata, no --arch
    guessed = create_encoder(tmp_path / "pytorch_model.bin", device="cpu")
    assert guessed.name == "tiny-virchow2"
    _same(guessed, reference)
    twin = dataclasses.replace(spec, name="tiny-virchow2-twin")  # one architecture, two names
    monkeypatch.setitem(zoo.ZOO, twin.name, twin)
    with pytest.raises(HDMILError, match=r"cannot tell.*tiny-virchow2, tiny-virchow2-twin.*--arch"):
        create_encoder(tmp_path / "pytorch_model.bin", device="cpu")
    assert create_encoder(tmp_path / "pytorch_model.bin", arch=twin.name, device="cpu").name == twin.name


def test_a_repo_without_safetensors_gets_its_torch_file(tmp_path, tiny, monkeypatch):
    spec, reference = tiny
    weights = tmp_path / "pytorch_model.bin"
    torch.save(_hub_state(reference), weights)
    missing = hub_errors.RemoteEntryNotFoundError("404 model.safetensors", response=_response(404))
    calls = _fake_hub(monkeypatch, weights, {"model.safetensors": missing})
    _same(create_encoder(spec.name, pretrained=True, device="cpu"), reference)
    assert [u.rsplit("/", 1)[-1] for u, _ in calls["metadata"]] == ["model.safetensors", "pytorch_model.bin"]
    assert [f for _, f, _ in calls["download"]] == ["pytorch_model.bin"]
