"""The FID Inception: shapes, torch's bilinear resize, the weight files, and, where torch and
pytorch-fid are installed, the pool3 features against pytorch-fid's own network."""

import importlib
import sys
import zipfile
from unittest import mock

import jax
import numpy as np
import pytest

from ddsm_jax.eval import inception
from ddsm_jax.eval.convert_inception import convert, convert_state_dict, save_params
from ddsm_jax.eval.features import compute_features


@pytest.fixture(scope="module")
def params():
    return inception.random_inception_params(0)


@pytest.fixture(scope="module")
def apply():
    return jax.jit(inception.apply)


def _flat(params):
    return {"/".join(k.key for k in path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def test_features_of_small_rgb_images_have_the_pool3_shape(params, apply):
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    features = np.asarray(apply(params, images))
    assert features.shape == (2, 2048)
    assert np.all(np.isfinite(features)) and np.all(features >= 0)  # a mean of ReLUs
    assert not np.allclose(features[0], features[1])


def test_grey_images_through_compute_features_equal_repeated_rgb(params, apply):
    grey = np.random.default_rng(1).uniform(-1, 1, (3, 8, 8, 1)).astype(np.float32)
    extractor = inception.inception_extractor_from_params(params)
    assert (extractor.name, extractor.dim) == ("inception_pool3", 2048)
    features = compute_features(extractor, grey, batch_size=8)
    assert features.shape == (3, 2048)
    rgb = np.asarray(apply(params, np.repeat(grey, 3, axis=-1)))
    np.testing.assert_allclose(features, rgb, rtol=1e-5, atol=1e-5 * np.abs(rgb).max())


def test_apply_rejects_two_channels_and_integer_images(params):
    with pytest.raises(ValueError, match="1 or 3 channels"):
        inception.apply(params, np.zeros((1, 8, 8, 2), np.float32))
    with pytest.raises(AssertionError, match="uint8"):
        inception.apply(params, np.zeros((1, 8, 8, 3), np.uint8))


# ------------------------------------------------------------------------------------ resize

def test_bilinear_matrix_hand_computed():
    # Up 2 -> 4: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (upper neighbour clamped).
    np.testing.assert_allclose(inception.bilinear_matrix(2, 4),
                               [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    # Down 4 -> 2: sources 0.5 and 2.5, two pixels each; no antialiasing (an antialiased
    # resize, like jax.image.resize, would spread over all four: 1/8, 3/8, 3/8, 1/8).
    np.testing.assert_allclose(inception.bilinear_matrix(4, 2),
                               [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    # Down 5 -> 2: sources 0.75 and 3.25.
    np.testing.assert_allclose(inception.bilinear_matrix(5, 2),
                               [[0.25, 0.75, 0, 0, 0], [0, 0, 0, 0.75, 0.25]])
    np.testing.assert_allclose(inception.bilinear_matrix(7, 7), np.eye(7))


def _torch_bilinear_reference(image, height, width):
    """Per-pixel float64 transcription of torch's bilinear, align_corners=False, one image."""
    h_in, w_in, _ = image.shape
    out = np.zeros((height, width, image.shape[-1]))
    for i in range(height):
        y = max((i + 0.5) * h_in / height - 0.5, 0.0)
        y0 = int(y)
        y1, fy = min(y0 + 1, h_in - 1), y - y0
        for j in range(width):
            x = max((j + 0.5) * w_in / width - 0.5, 0.0)
            x0 = int(x)
            x1, fx = min(x0 + 1, w_in - 1), x - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * image[y0, x0] + fx * image[y0, x1])
                         + fy * ((1 - fx) * image[y1, x0] + fx * image[y1, x1]))
    return out


def test_resize_matches_the_per_pixel_formula_up_and_down():
    images = np.random.default_rng(2).normal(size=(2, 3, 11, 2)).astype(np.float32)
    got = np.asarray(inception.resize_bilinear(images, 7, 4))  # up in H, down in W
    want = np.stack([_torch_bilinear_reference(image, 7, 4) for image in images])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_resize_matches_torch_interpolate():
    torch = pytest.importorskip("torch", reason="comparing with F.interpolate needs torch")
    interpolate = torch.nn.functional.interpolate
    for size in (2, 8, 32, 300, 384, 512, 777):  # weights: resize an identity along H only
        eye = torch.eye(size)[None, None]
        want = interpolate(eye, size=(299, size), mode="bilinear", align_corners=False)
        np.testing.assert_array_equal(inception.bilinear_matrix(size, 299), want[0, 0].numpy(),
                                      err_msg=f"{size} -> 299")
    rng = np.random.default_rng(3)
    for height, width in [(8, 8), (32, 32), (300, 299), (512, 384)]:
        images = rng.uniform(-1, 1, (1, height, width, 3)).astype(np.float32)
        want = interpolate(
            torch.from_numpy(images.transpose(0, 3, 1, 2)), size=(299, 299), mode="bilinear",
            align_corners=False).numpy().transpose(0, 2, 3, 1)
        got = np.asarray(inception.resize_bilinear(images, 299, 299))
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-6, err_msg=f"{height}x{width}")


# ------------------------------------------------------------------------------ weight files

def test_params_round_trip_through_the_npz(tmp_path, params):
    path = save_params(_flat(params), tmp_path / "inception.npz")
    extractor = inception.inception_extractor(path)
    loaded = _flat(extractor.params)
    assert loaded.keys() == _flat(params).keys()
    for key, value in _flat(params).items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)


def test_loader_errors_name_the_file_and_the_converter(tmp_path, params):
    with pytest.raises(FileNotFoundError, match="nothere.npz not found.*convert_inception"):
        inception.load_inception_params(tmp_path / "nothere.npz")

    text = tmp_path / "text.npz"
    text.write_text("not an archive")
    with pytest.raises(ValueError, match="text.npz is not an .npz archive.*convert_inception"):
        inception.load_inception_params(text)

    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(ValueError, match="single.npy is not an .npz archive.*convert_inception"):
        inception.load_inception_params(single)

    pth = tmp_path / "weights.pth"  # how torch.save lays out a checkpoint
    with zipfile.ZipFile(pth, "w") as archive:
        archive.writestr("weights/data.pkl", b"")
    with pytest.raises(ValueError, match="weights.pth is a PyTorch checkpoint.*convert_inception"):
        inception.load_inception_params(pth)

    flat = _flat(params)
    del flat["Mixed_6b/branch7x7_2/conv/kernel"]
    flat["Mixed_7c/branch1x1/bn/var"] = np.ones(3, np.float32)
    flat["extra"] = np.ones(1, np.float32)
    save_params(flat, tmp_path / "wrong.npz")
    with pytest.raises(ValueError, match=(
            r"wrong.npz is not FID Inception weights: 1 missing \(e.g. "
            r"Mixed_6b/branch7x7_2/conv/kernel\), 1 unexpected \(e.g. extra\), 1 misshaped "
            r"\(e.g. Mixed_7c/branch1x1/bn/var \(3,\) != \(320,\)\) keys; .*convert_inception")):
        inception.load_inception_params(tmp_path / "wrong.npz")


def _torch_layout_state_dict(seed):
    """A state_dict as pytorch-fid's file lays it out, built from torch's naming and OIHW."""
    rng = np.random.default_rng(seed)
    state = {"fc.weight": rng.normal(size=(1008, 2048)), "fc.bias": rng.normal(size=1008)}
    for name, (kh, kw, c_in, c_out) in inception.conv_shapes().items():
        module = name.replace("/", ".")
        state[f"{module}.conv.weight"] = rng.normal(size=(c_out, c_in, kh, kw))
        for field in ("weight", "bias", "running_mean", "running_var"):
            state[f"{module}.bn.{field}"] = rng.normal(size=c_out)
        state[f"{module}.bn.num_batches_tracked"] = np.array(0)
    return state


def test_convert_state_dict_maps_names_and_layouts():
    state = _torch_layout_state_dict(4)
    flat = convert_state_dict(state)
    assert flat.keys() == inception.param_shapes().keys()
    kernel = flat["Mixed_6b/branch7x7_2/conv/kernel"]  # a 1x7 kernel: H and W must not swap
    assert kernel.shape == (1, 7, 128, 128) and kernel.dtype == np.float32
    torch_kernel = state["Mixed_6b.branch7x7_2.conv.weight"]
    assert kernel[0, 5, 3, 7] == np.float32(torch_kernel[7, 3, 0, 5])
    np.testing.assert_array_equal(flat["Mixed_7c/branch_pool/bn/mean"],
                                  state["Mixed_7c.branch_pool.bn.running_mean"].astype(np.float32))
    np.testing.assert_array_equal(flat["Conv2d_1a_3x3/bn/scale"],
                                  state["Conv2d_1a_3x3.bn.weight"].astype(np.float32))


def test_convert_state_dict_rejects_other_checkpoints():
    state = _torch_layout_state_dict(5)
    with pytest.raises(ValueError, match=r"1 unexpected keys \(e.g. Mixed_5b.branch1x1.conv.bias"):
        convert_state_dict({**state, "Mixed_5b.branch1x1.conv.bias": np.zeros(64)})
    with pytest.raises(ValueError, match="unexpected keys.*pt_inception-2015-12-05"):
        convert_state_dict({**state, "model.extra.weight": np.zeros(1)})
    del state["Mixed_7a.branch3x3_2.bn.running_var"]
    with pytest.raises(ValueError, match="1 missing.*Mixed_7a/branch3x3_2/bn/var"):
        convert_state_dict(state)
    state = _torch_layout_state_dict(5)
    state["Conv2d_2a_3x3.conv.weight"] = np.zeros((32, 32, 5, 5))
    with pytest.raises(ValueError, match=r"misshaped.*Conv2d_2a_3x3/conv/kernel \(5, 5, 32, 32\)"):
        convert_state_dict(state)


# ---------------------------------------------------------------- the reference: pytorch-fid

_TORCH_LIBRARIES = []


def _import_pytorch_fid_inception():
    """pytorch_fid.inception, or a skip saying what is missing.

    torchvision's only wheels here are CUDA builds: their compiled ops (`_C.so`) cannot load on
    the CPU torch, which torchvision tolerates, except that it still registers shape functions
    for two of those ops (nms, qnms) and fails on import. Declaring the two schemas (never
    called; the Inception model is pure torch.nn) lets the real torchvision and pytorch-fid
    import unchanged.
    """
    torch = pytest.importorskip("torch", reason="the pytorch-fid reference needs torch")
    pytest.importorskip("pytorch_fid", reason="the reference needs pytorch-fid "
                        "(pip install --no-deps pytorch-fid)")
    try:
        importlib.import_module("torchvision")
    except ImportError as error:
        pytest.skip(f"pytorch-fid needs torchvision: {error}")
    except RuntimeError as error:
        if "does not exist" not in str(error):
            raise
        for name in [name for name in sys.modules if name.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        library = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCH_LIBRARIES.append(library)  # a collected Library drops its definitions
        importlib.import_module("torchvision")
    return torch, importlib.import_module("pytorch_fid.inception")


def _random_like(torch, state, seed):
    """Random weights of `state`'s keys and shapes; BN statistics far from (0, 1) so BN counts,
    He-scaled kernels so activations stay O(1) through 94 convs."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, value in state.items():
        shape = tuple(value.shape)
        if key.endswith("num_batches_tracked"):
            array = np.zeros(shape, np.int64)
        elif key.endswith("conv.weight"):
            array = rng.normal(0, np.sqrt(2 / np.prod(shape[1:])), shape)
        elif key.endswith(("bn.weight", "running_var")):
            array = rng.uniform(0.5, 1.5, shape)
        else:  # bn.bias, running_mean, fc
            array = rng.normal(0, 0.2, shape)
        out[key] = torch.from_numpy(np.asarray(array, np.int64 if array.dtype == np.int64
                                               else np.float32))
    return out


def test_features_match_pytorch_fid(tmp_path, apply):
    torch, fid_inception = _import_pytorch_fid_inception()
    # Build pytorch-fid's InceptionV3 as FID uses it, but hand it random weights of the real
    # file's keys and shapes instead of downloading: capture the torchvision network that
    # fid_inception_v3() builds and patches, and serve its state_dict, randomised, as the file.
    built = []

    def capture(*args, **kwargs):
        built.append(real_inception_v3(*args, **kwargs))
        return built[-1]

    weights = {}

    def fake_download(url, progress=True):
        assert url.endswith(inception.TORCH_WEIGHTS_NAME)
        weights.update(_random_like(torch, built[0].state_dict(), seed=6))
        return weights

    real_inception_v3 = fid_inception._inception_v3
    with mock.patch.object(fid_inception, "_inception_v3", capture), \
            mock.patch.object(fid_inception, "load_state_dict_from_url", fake_download):
        reference = fid_inception.InceptionV3(
            [fid_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
            normalize_input=True, use_fid_inception=True).eval()

    pth = tmp_path / inception.TORCH_WEIGHTS_NAME
    torch.save(weights, pth)
    convert(pth, tmp_path / "inception_fid.npz")  # the real command's path
    extractor = inception.inception_extractor(tmp_path / "inception_fid.npz")

    # Up-sampled (32 -> 299) and down-sampled (331x307 -> 299, where an antialiased resize
    # would differ) inputs, in pytorch-fid's NCHW [0, 1] and our NHWC [-1, 1].
    rng = np.random.default_rng(7)
    for shape in [(2, 32, 32, 3), (1, 331, 307, 3)]:
        images01 = rng.uniform(0, 1, shape).astype(np.float32)
        with torch.no_grad():
            (ref,) = reference(torch.from_numpy(images01.transpose(0, 3, 1, 2)))
        ref = ref.numpy().reshape(shape[0], 2048)
        ours = np.asarray(apply(extractor.params, images01 * 2 - 1))
        deviation = np.abs(ours - ref).max() / np.abs(ref).max()
        print(f"{shape}: max |ours - pytorch-fid| / max |pytorch-fid| = {deviation:.2e} "
              f"(features up to {np.abs(ref).max():.3g})")
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                   err_msg=str(shape))
