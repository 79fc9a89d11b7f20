"""Encoder registry, option validation and every encoder family, on real models only.

Nothing here downloads: open_clip runs a tiny randomly initialised CLIP written to a temporary
folder, ONNX runs a tiny conv net exported by torch, TFLite runs the pretrained models in
``../shared/models`` (skipped when absent) and the text encoder is the packaged MiniLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from caselens.errors import EncoderOptionError, UnknownEncoderError, UnsupportedModalityError
from caselens.ingest.encoders import available, load_encoder, load_from_record, register, registry
from conftest import SHARED_DATA, SHARED_MODELS, needs_shared

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _unit_rows(v: np.ndarray) -> None:
    assert v.dtype == np.float32
    assert np.all(np.isfinite(v))
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def _stripes(size: int = 96, period: float = 3.0, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    _, xx = np.mgrid[:size, :size]
    arr = (np.sin(xx / period) > 0) * 200 + rng.integers(0, 30, (size, size))
    return Image.fromarray(arr.astype(np.uint8), "L")


def _blob(size: int = 96, seed: int = 1) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    g = np.exp(-((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (2 * (size / 6) ** 2)) * 230
    rgb = np.stack([g, g * 0.6, g * 0.3], -1) + rng.integers(0, 20, (size, size, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def _add_noise(image: Image.Image, amount: int = 6, seed: int = 7) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.asarray(image.convert("RGB"), np.int16) + rng.integers(-amount, amount + 1, image.size[::-1] + (3,))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _random_images(n: int, seed: int = 0, shape=(40, 52, 3)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), "RGB") for _ in range(n)]


# --------------------------------------------------------------------------------------------
# 1. registry and names
# --------------------------------------------------------------------------------------------


@pytest.fixture
def scratch_registry(monkeypatch):
    """A private copy of the scheme table, restored after the test (built-ins loaded first)."""
    available()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    return registry._REGISTRY


@pytest.mark.parametrize("scheme", ["", "Classic", "1abc", "-abc", "a b", "a:b", "a.b", "ünï", "a/b"])
def test_register_rejects_malformed_scheme(scratch_registry, scheme):
    with pytest.raises(ValueError, match="scheme"):
        register(scheme, "test")
    assert scheme not in scratch_registry


def test_register_rejects_scheme_with_trailing_newline(scratch_registry):
    with pytest.raises(ValueError, match="scheme"):
        register("caselens-test-nl\n", "test")(lambda target, options: None)


@pytest.mark.parametrize("scheme", ["classic", "pixels", "onnx", "open_clip", "sentence-transformers",
                                    "hf-hub", "local-dir"])
def test_register_rejects_existing_scheme_and_alias(scratch_registry, scheme):
    before = dict(scratch_registry)
    with pytest.raises(ValueError, match="already registered"):
        register(scheme, "impostor")(lambda target, options: None)
    assert scratch_registry == before  # the original loader survives


def test_register_new_scheme_loads_and_second_registration_fails(scratch_registry):
    seen = {}

    def loader(target, options):
        seen["call"] = (target, options)
        return load_encoder("pixels", {"size": 4})

    assert register("caselens-test-x1", "a test scheme")(loader) is loader
    enc = load_encoder("caselens-test-x1:some/target", {"k": 1})
    assert seen["call"] == ("some/target", {"k": 1})
    assert enc.dim == 4 * 4 * 3
    assert available()["caselens-test-x1"] == "a test scheme"
    with pytest.raises(ValueError, match="already registered"):
        register("caselens-test-x1", "again")(loader)
    with pytest.raises(TypeError):
        register("caselens-test-x2", "not callable")("not a function")
    assert "caselens-test-x2" not in scratch_registry


def test_unknown_scheme_names_known_schemes():
    with pytest.raises(UnknownEncoderError) as err:
        load_encoder("nope:x")
    msg = str(err.value)
    assert "'nope:x'" in msg and "'nope'" in msg
    for scheme in ("classic", "pixels", "onnx", "tflite", "open_clip", "sentence-transformers", "hf-hub", "local-dir"):
        assert scheme in msg
    assert isinstance(err.value, KeyError)  # UnknownEncoderError is also a KeyError
    assert not msg.startswith('"')  # and prints without KeyError's quoting


def test_available_lists_builtins_with_summaries():
    schemes = available()
    assert {"classic", "pixels", "onnx", "tflite", "open_clip", "sentence-transformers"} <= set(schemes)
    assert all(isinstance(s, str) and s for s in schemes.values())
    assert list(schemes) == sorted(schemes)


@pytest.mark.parametrize("name, expected", [
    ("hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
     ("open_clip", "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")),
    ("local-dir:/models/my clip", ("open_clip", "local-dir:/models/my clip")),
    ("local-dir:C:/models/x", ("open_clip", "local-dir:C:/models/x")),
    ("HF-Hub:org/repo", ("open_clip", "hf-hub:org/repo")),
    ("open_clip:local-dir:/m", ("open_clip", "local-dir:/m")),
    ("open_clip:ViT-B-32@/ckpt/a.pt", ("open_clip", "ViT-B-32@/ckpt/a.pt")),
    ("  classic  ", ("classic", "")),
    ("Sentence-Transformers:all-MiniLM-L6-v2", ("sentence-transformers", "all-MiniLM-L6-v2")),
    ("onnx:/a/b:c.onnx", ("onnx", "/a/b:c.onnx")),
])
def test_parse_name(name, expected):
    assert registry.parse_name(name) == expected


# --------------------------------------------------------------------------------------------
# 2. options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, options, option", [
    ("classic", {"sizze": 3}, "sizze"),
    ("pixels", {"colour": True}, "colour"),
    ("open_clip:ViT-B-32@x", {"batchsize": 2}, "batchsize"),
    ("sentence-transformers", {"prefix": "q: "}, "prefix"),
])
def test_unknown_option_is_named(name, options, option):
    with pytest.raises(EncoderOptionError, match=option):
        load_encoder(name, options)


@pytest.mark.parametrize("name, options, option", [
    ("classic", {"size": "abc"}, "size"),
    ("classic", {"size": [1, 2]}, "size"),
    ("pixels", {"size": "1.5x"}, "size"),
    ("sentence-transformers", {"batch_size": "many"}, "batch_size"),
])
def test_unconvertible_option_is_named(name, options, option):
    with pytest.raises(EncoderOptionError, match=f"option {option}="):
        load_encoder(name, options)


def test_string_options_are_converted():
    enc = load_encoder("classic", {"size": "64"})
    assert enc.info.options == {"size": 64}
    assert enc.info.fingerprint == load_encoder("classic", {"size": 64}).info.fingerprint


def test_classic_rejects_bad_size_value():
    with pytest.raises(ValueError, match="size"):
        load_encoder("classic", {"size": 60})
    with pytest.raises(ValueError, match="size"):
        load_encoder("classic", {"size": 24})


# --------------------------------------------------------------------------------------------
# 3. classic and pixels
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["classic", "pixels"])
def test_training_free_encoders_basic(scheme):
    enc = load_encoder(scheme)
    images = [_stripes(), _blob(), _stripes(64, 5.0, 3).convert("I;16"), Image.new("RGB", (50, 30), (0, 0, 0))]
    v = enc.encode_images(images)
    assert v.shape == (4, enc.dim)
    _unit_rows(v[:3])
    assert np.all(np.isfinite(v[3]))
    np.testing.assert_array_equal(v, enc.encode_images(images))  # deterministic
    np.testing.assert_array_equal(v, load_encoder(scheme).encode_images(images))
    assert enc.encode_images([]).shape == (0, enc.dim)
    assert enc.info.modalities == ("image",)
    assert load_encoder(scheme).info.fingerprint == enc.info.fingerprint
    other = load_encoder(scheme, {"size": 32})
    assert other.info.fingerprint != enc.info.fingerprint
    assert other.info.options == {"size": 32}
    rebuilt = load_from_record(json.loads(json.dumps(other.info.to_record())))
    assert rebuilt.info == other.info
    with pytest.raises(UnsupportedModalityError, match=scheme):
        enc.encode_texts(["a chest x-ray"])
    with pytest.raises(UnsupportedModalityError):
        enc.encode_queries(["a chest x-ray"])
    assert enc.max_tokens() is None and enc.count_tokens("x") is None


def test_classic_dims_follow_size():
    a, b = load_encoder("classic"), load_encoder("classic", {"size": 64})
    assert a.dim == b.dim  # the descriptor is histogram based: its length does not depend on the thumbnail
    assert a.encode_images([_blob()]).shape == (1, a.dim)
    assert not np.allclose(a.encode_images([_stripes()]), b.encode_images([_stripes()]))


def test_classic_separates_different_images_more_than_near_identical():
    enc = load_encoder("classic")
    stripes, blob = _stripes(), _blob()
    v = enc.encode_images([stripes, _add_noise(stripes), blob, _add_noise(blob, seed=8)])
    near_s, near_b = float(v[0] @ v[1]), float(v[2] @ v[3])
    far = float(v[0] @ v[2])
    assert near_s > 0.9 and near_b > 0.9
    assert far < near_s - 0.2 and far < near_b - 0.2


def test_pixels_values():
    enc = load_encoder("pixels", {"size": 4})
    assert enc.dim == 48
    v = enc.encode_images([Image.new("RGB", (20, 10), (90, 90, 90)), Image.new("RGB", (8, 8), (255, 0, 0))])
    np.testing.assert_allclose(v[0], np.full(48, 1 / np.sqrt(48)), atol=1e-6)
    expected = np.tile([1.0, 0.0, 0.0], 16) / 4.0
    np.testing.assert_allclose(v[1], expected, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 4. sentence-transformers (packaged MiniLM)
# --------------------------------------------------------------------------------------------


def test_minilm_vectors(minilm):
    assert minilm.dim == 384
    assert minilm.info.modalities == ("text",)
    texts = ["The chest radiograph shows a right lower lobe pneumonia.",
             "Chest X-ray demonstrates consolidation in the right lower lobe consistent with pneumonia.",
             "The stock market closed higher on Friday after strong earnings reports."]
    v = minilm.encode_texts(texts)
    assert v.shape == (3, 384)
    _unit_rows(v)
    assert float(v[0] @ v[1]) > float(v[0] @ v[2]) + 0.3
    np.testing.assert_allclose(minilm.encode_queries(texts), v, atol=1e-5)  # no prefixes: same vectors
    np.testing.assert_allclose(minilm.encode_texts(texts[:1]), v[:1], atol=1e-5)
    assert minilm.encode_texts([]).shape == (0, 384)


def test_minilm_tokens(minilm):
    limit = minilm.max_tokens()
    assert isinstance(limit, int) and 64 <= limit <= 512
    short = minilm.count_tokens("pneumonia")
    assert isinstance(short, int) and 3 <= short <= 6  # [CLS] + word pieces + [SEP]
    assert minilm.count_tokens("") == 2
    one = minilm.count_tokens("The lesion is well circumscribed.")
    assert minilm.count_tokens("The lesion is well circumscribed. " * 3) > 2 * one
    assert minilm.count_tokens("word " * (2 * limit)) > limit  # counts past the limit, no truncation


def test_minilm_is_text_only(minilm):
    with pytest.raises(UnsupportedModalityError, match="sentence-transformers"):
        minilm.encode_images([_blob()])


def test_minilm_fingerprint_and_prefixes(minilm):
    again = load_from_record(json.loads(json.dumps(minilm.info.to_record())))
    assert again.info.fingerprint == minilm.info.fingerprint
    prefixed = load_encoder("sentence-transformers:all-MiniLM-L6-v2", {"query_prefix": "query: "})
    assert prefixed.info.fingerprint != minilm.info.fingerprint
    text = ["melanoma with irregular pigment network"]
    np.testing.assert_allclose(prefixed.encode_texts(text), minilm.encode_texts(text), atol=1e-5)
    np.testing.assert_allclose(prefixed.encode_queries(text), minilm.encode_texts(["query: " + text[0]]), atol=1e-5)
    assert not np.allclose(prefixed.encode_queries(text), minilm.encode_queries(text), atol=1e-3)


# --------------------------------------------------------------------------------------------
# 5. open_clip with a tiny randomly initialised CLIP (no download)
# --------------------------------------------------------------------------------------------

TINY_ARCH = "caselens-test-tiny-clip"
TINY_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP saved three ways: local-dir (safetensors), a changed copy, ARCH@ckpt.pt."""
    import open_clip
    import torch
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_clip")
    torch.manual_seed(0)
    model = CLIP(**json.loads(json.dumps(TINY_CFG))).eval()
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    preprocess_cfg = {"mean": list(OPENAI_DATASET_MEAN), "std": list(OPENAI_DATASET_STD)}

    def write_dir(name: str, tensors: dict, preprocess: dict = preprocess_cfg) -> Path:
        folder = root / name
        folder.mkdir()
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": preprocess}))
        save_file(tensors, str(folder / "open_clip_model.safetensors"))
        return folder

    local = write_dir("local", state)
    changed_state = dict(state)
    key = "visual.proj"
    changed_state[key] = state[key].clone()
    changed_state[key][0, 0] += 0.5
    changed = write_dir("changed", changed_state)
    # open_clip's own defaults (no preprocess_cfg), as an ARCH@checkpoint load gets them
    default_pre = write_dir("default_preprocess", state, {})

    (root / f"{TINY_ARCH}.json").write_text(json.dumps(TINY_CFG))
    open_clip.add_model_config(root / f"{TINY_ARCH}.json")
    ckpt = root / "tiny.pt"
    torch.save(state, ckpt)
    return {"model": model, "local": local, "changed": changed, "default_preprocess": default_pre, "ckpt": ckpt}


@pytest.fixture(scope="session")
def tiny_clip_encoder(tiny_clip):
    return load_encoder(f"local-dir:{tiny_clip['local']}")


def _clip_images() -> list[Image.Image]:
    return [_blob(), _stripes(), _stripes(60, 2.0, 5).convert("I;16"), Image.new("RGB", (70, 40), (10, 200, 30))]


def test_open_clip_local_dir_vectors(tiny_clip, tiny_clip_encoder):
    import torch

    enc = tiny_clip_encoder
    assert enc.info.spec == f"open_clip:local-dir:{tiny_clip['local']}"
    assert enc.dim == 32
    assert enc.info.modalities == ("image", "text")
    images = _clip_images()
    iv = enc.encode_images(images)
    assert iv.shape == (4, 32)
    _unit_rows(iv)
    tv = enc.encode_texts(["a chest x-ray", "melanoma", "a very long report " * 20])  # longer than context
    assert tv.shape == (3, 32)
    _unit_rows(tv)
    np.testing.assert_allclose(enc.encode_queries(["melanoma"]), tv[1:2], atol=1e-6)
    assert enc.encode_images([]).shape == (0, 32) and enc.encode_texts([]).shape == (0, 32)
    # The vectors are those of the saved weights (not a fresh random init).
    with torch.no_grad():
        direct = tiny_clip["model"].encode_image(torch.stack([enc.preprocess(im.convert("RGB")) for im in images[:2]]))
    direct = direct.numpy() / np.linalg.norm(direct.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(iv[:2], direct, atol=1e-5)


def test_open_clip_batches_match_single(tiny_clip):
    enc = load_encoder(f"local-dir:{tiny_clip['local']}", {"batch_size": "3"})
    images = _clip_images() + _random_images(3)
    batched = enc.encode_images(images)
    single = np.concatenate([enc.encode_images([im]) for im in images])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    texts = ["a", "b c", "nodule", "effusion", "fracture"]
    np.testing.assert_allclose(enc.encode_texts(texts), np.concatenate([enc.encode_texts([t]) for t in texts]), atol=1e-5)


def test_open_clip_fingerprint(tiny_clip, tiny_clip_encoder):
    again = load_encoder(f"open_clip:local-dir:{tiny_clip['local']}")
    assert again.info.spec == tiny_clip_encoder.info.spec
    assert again.info.fingerprint == tiny_clip_encoder.info.fingerprint
    images = _clip_images()
    np.testing.assert_allclose(again.encode_images(images), tiny_clip_encoder.encode_images(images), atol=1e-6)
    changed = load_encoder(f"local-dir:{tiny_clip['changed']}")
    assert changed.info.fingerprint != tiny_clip_encoder.info.fingerprint
    rebuilt = load_from_record(json.loads(json.dumps(again.info.to_record())))
    assert rebuilt.info.fingerprint == again.info.fingerprint


def test_open_clip_arch_with_local_checkpoint(tiny_clip, tiny_clip_encoder):
    enc = load_encoder(f"open_clip:{TINY_ARCH}@{tiny_clip['ckpt']}")
    assert enc.info.spec == f"open_clip:{TINY_ARCH}@{tiny_clip['ckpt']}"
    assert enc.dim == 32
    images, texts = _clip_images(), ["pleural effusion", "normal study"]
    iv, tv = enc.encode_images(images), enc.encode_texts(texts)
    _unit_rows(iv)
    _unit_rows(tv)
    # Same weights and preprocessing values as the local-dir copy: interchangeable vectors.
    np.testing.assert_allclose(iv, tiny_clip_encoder.encode_images(images), atol=1e-5)
    np.testing.assert_allclose(tv, tiny_clip_encoder.encode_texts(texts), atol=1e-5)
    assert load_encoder(f"open_clip:{TINY_ARCH}@{tiny_clip['ckpt']}").info.fingerprint == enc.info.fingerprint
    # With open_clip's default preprocessing in the folder too, the fingerprints agree.
    # (The fingerprint hashes repr(preprocess), so JSON lists vs built-in tuples for mean/std
    # give a different, conservative fingerprint for the list-configured local-dir copy.)
    same = load_encoder(f"local-dir:{tiny_clip['default_preprocess']}")
    assert same.info.fingerprint == enc.info.fingerprint
    np.testing.assert_allclose(same.encode_images(images), iv, atol=1e-6)


@pytest.mark.parametrize("target", ["ViT-B-32", "ViT-B-32@", f"{TINY_ARCH}"])
def test_open_clip_without_weights_is_refused(target):
    with pytest.raises(EncoderOptionError, match="weights"):
        load_encoder(f"open_clip:{target}")


# --------------------------------------------------------------------------------------------
# 6. onnx
# --------------------------------------------------------------------------------------------


def _tiny_net():
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 16),
    ).eval()


def _export(net, path: Path, dynamic_batch: bool) -> Path:
    import torch

    kwargs = {"dynamic_axes": {"pixels": {0: "batch"}, "embedding": {0: "batch"}}} if dynamic_batch else {}
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it)
        dynamo = {}
    except ImportError:
        dynamo = {"dynamo": False}
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(path), input_names=["pixels"],
                      output_names=["embedding"], **kwargs, **dynamo)
    return path


@pytest.fixture(scope="session")
def onnx_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    net = _tiny_net()
    return {"net": net,
            "dynamic": _export(net, root / "dynamic.onnx", True),
            "fixed": _export(net, root / "fixed.onnx", False)}


def test_onnx_vectors(onnx_models):
    import torch

    path = onnx_models["dynamic"]
    enc = load_encoder(f"onnx:{path}", {"input_size": 32})
    assert enc.dim == 16
    assert enc.info.spec == f"onnx:{path.resolve()}"
    assert enc.info.modalities == ("image",)
    images = _random_images(5) + [_blob(), _stripes()]
    v = enc.encode_images(images)
    assert v.shape == (7, 16)
    _unit_rows(v)
    single = np.concatenate([enc.encode_images([im]) for im in images])
    np.testing.assert_allclose(v, single, atol=1e-5)
    # The same numbers torch gives for the same pixels (centre crop, resize, [0, 1], NCHW).
    im = images[0]
    w, h = im.size
    side = min(w, h)
    crop = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side))
    arr = np.asarray(crop.resize((32, 32), Image.BILINEAR), np.float32) / 255.0
    with torch.no_grad():
        ref = onnx_models["net"](torch.from_numpy(arr.transpose(2, 0, 1)[None].copy())).numpy()
    np.testing.assert_allclose(v[0], ref[0] / np.linalg.norm(ref[0]), atol=1e-4)
    with pytest.raises(UnsupportedModalityError):
        enc.encode_texts(["x"])


def test_onnx_batch_size_option_and_fingerprint(onnx_models):
    path = onnx_models["dynamic"]
    enc = load_encoder(f"onnx:{path}", {"input_size": 32})
    small = load_encoder(f"onnx:{path}", {"input_size": "32", "batch_size": "2", "threads": 1})
    images = _random_images(5, seed=3)
    np.testing.assert_allclose(small.encode_images(images), enc.encode_images(images), atol=1e-5)
    assert small.info.fingerprint == enc.info.fingerprint  # batching and threads do not change vectors
    assert load_encoder(f"onnx:{path}", {"input_size": 32}).info.fingerprint == enc.info.fingerprint
    normed = load_encoder(f"onnx:{path}", {"input_size": 32, "mean": "0.5,0.5,0.5", "std": [0.25, 0.25, 0.25]})
    assert normed.info.options["mean"] == [0.5, 0.5, 0.5]
    assert normed.info.fingerprint != enc.info.fingerprint
    assert not np.allclose(normed.encode_images(images), enc.encode_images(images), atol=1e-3)
    assert load_encoder(f"onnx:{path}", {"input_size": 32, "crop": "resize"}).info.fingerprint != enc.info.fingerprint
    rebuilt = load_from_record(json.loads(json.dumps(normed.info.to_record())))
    assert rebuilt.info.fingerprint == normed.info.fingerprint


def test_onnx_fixed_batch_model_single_image_path(onnx_models):
    enc = load_encoder(f"onnx:{onnx_models['fixed']}", {"input_size": 32, "batch_size": 1})
    images = _random_images(3, seed=5)
    np.testing.assert_allclose(enc.encode_images(images),
                               load_encoder(f"onnx:{onnx_models['dynamic']}", {"input_size": 32}).encode_images(images),
                               atol=1e-5)


def test_onnx_fixed_batch_model_default_batching(onnx_models):
    enc = load_encoder(f"onnx:{onnx_models['fixed']}", {"input_size": 32})
    images = _random_images(3, seed=5)
    v = enc.encode_images(images)
    np.testing.assert_allclose(v, np.concatenate([enc.encode_images([im]) for im in images]), atol=1e-5)


def test_onnx_errors(onnx_models, tmp_path):
    path = onnx_models["dynamic"]
    with pytest.raises(EncoderOptionError, match="sizze"):
        load_encoder(f"onnx:{path}", {"sizze": 32})
    with pytest.raises(EncoderOptionError, match="nope"):
        load_encoder(f"onnx:{path}", {"input_size": 32, "output": "nope"})
    assert load_encoder(f"onnx:{path}", {"input_size": 32, "output": "embedding"}).dim == 16
    with pytest.raises(EncoderOptionError, match="not found"):
        load_encoder(f"onnx:{tmp_path / 'missing.onnx'}")
    with pytest.raises(EncoderOptionError, match="not found"):
        load_encoder(f"onnx:{tmp_path}")  # a folder is not a model file
    with pytest.raises(EncoderOptionError, match="not found"):
        load_encoder("onnx:")
    with pytest.raises(EncoderOptionError, match="crop"):
        load_encoder(f"onnx:{path}", {"input_size": 32, "crop": "zoom"})
    with pytest.raises(EncoderOptionError, match="layout"):
        load_encoder(f"onnx:{path}", {"input_size": 32, "layout": "chw"})
    with pytest.raises(EncoderOptionError, match="mean"):
        load_encoder(f"onnx:{path}", {"input_size": 32, "mean": "0.5,0.5"})
    with pytest.raises(EncoderOptionError, match="std"):
        load_encoder(f"onnx:{path}", {"input_size": 32, "std": [1, 0, 1]})
    with pytest.raises(EncoderOptionError, match="option mean="):
        load_encoder(f"onnx:{path}", {"input_size": 32, "mean": "a,b,c"})


# --------------------------------------------------------------------------------------------
# 7. tflite with the shared pretrained models
# --------------------------------------------------------------------------------------------

MOBILENET_V2 = SHARED_MODELS / "mobilenet_v2_1.0_224_quant.tflite"
MOBILENET_V3 = SHARED_MODELS / "mobilenet_v3_small_075_224_embedder.tflite"
ISIC_IMAGES = SHARED_DATA / "images" / "isic" / "images"
TFLITE_MODELS = [
    pytest.param(MOBILENET_V2, {"output": "MobilenetV2/Logits/AvgPool"}, 1280, marks=needs_shared(MOBILENET_V2),
                 id="mobilenet_v2"),
    pytest.param(MOBILENET_V3, {}, 1024, marks=needs_shared(MOBILENET_V3), id="mobilenet_v3"),
]


@pytest.mark.parametrize("path, options, dim", TFLITE_MODELS)
def test_tflite_vectors(path, options, dim):
    enc = load_encoder(f"tflite:{path}", options)
    assert enc.dim == dim
    assert enc.info.options["input_size"] == 224
    images = [_blob(), _stripes(), _stripes(120, 6.0, 2).convert("I;16")]
    v = enc.encode_images(images)
    assert v.shape == (3, dim)
    _unit_rows(v)
    np.testing.assert_allclose(np.concatenate([enc.encode_images([im]) for im in images]), v, atol=1e-5)
    again = load_encoder(f"tflite:{path}", dict(options, batch_size=2))
    assert again.info.fingerprint == enc.info.fingerprint
    np.testing.assert_allclose(again.encode_images(images), v, atol=1e-5)
    rebuilt = load_from_record(json.loads(json.dumps(enc.info.to_record())))
    assert rebuilt.info.fingerprint == enc.info.fingerprint


@needs_shared(ISIC_IMAGES)
@pytest.mark.parametrize("path, options, dim", TFLITE_MODELS)
def test_tflite_crop_is_nearest_its_source(path, options, dim):
    files = sorted(ISIC_IMAGES.glob("*.jpg"))[:6]
    assert len(files) == 6
    sources = [Image.open(f).convert("RGB") for f in files]
    crops = [im.crop((im.width // 8, im.height // 8, im.width - im.width // 5, im.height - im.height // 6))
             for im in sources]
    enc = load_encoder(f"tflite:{path}", options)
    sim = enc.encode_images(crops) @ enc.encode_images(sources).T
    assert list(sim.argmax(axis=1)) == list(range(len(files))), np.round(sim, 3)


@needs_shared(MOBILENET_V2)
def test_tflite_errors(tmp_path):
    with pytest.raises(EncoderOptionError, match="MobilenetV2/Logits/AvgPoolX"):
        load_encoder(f"tflite:{MOBILENET_V2}", {"output": "MobilenetV2/Logits/AvgPoolX"})
    with pytest.raises(EncoderOptionError, match="NHWC"):
        load_encoder(f"tflite:{MOBILENET_V2}", {"layout": "nchw"})
    with pytest.raises(EncoderOptionError, match="not found"):
        load_encoder(f"tflite:{tmp_path / 'missing.tflite'}")
