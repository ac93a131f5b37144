"""Loading the official PyTorch DDSM release: its keys, its checkpoint file, and its numbers.

The strong test builds the release's U-Net in torch (tests/torch_release_unet.py, module names
as in the release), converts its random weights, and compares the two forward passes at every
width. Tests that need torch are skipped without it; the key/shape and error tests are not.
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddsm_jax import configs, export
from ddsm_jax.configs import cifar10
from ddsm_jax.convert_release import (
    TIME_TABLE_KEY,
    convert_checkpoint,
    convert_state_dict,
    load_release_checkpoint,
    release_key,
    release_shapes,
)
from ddsm_jax.models.network import abstract_network
from ddsm_jax.models.unet import timestep_embedding

RELEASE_SCHEDULE = configs.DIRECTORY / "release_cifar10_schedule.json"  # the release's searched widths
TORCH_REASON = "the release's checkpoints are PyTorch files: pip install torch to run this test"


def small_config(ch: int = 64, num_groups: int = 16):
    """The CIFAR-10 config shrunk: 16x16 images, levels (1, 2), attention at 8x8 (the release's
    `--attn=1`). ch=64 is the smallest base width at which the release runs all four widths (its
    time-projection rounding to 16 must meet the convs' rounding to 8); 16 groups divide every
    slimmed width, as in the release's g16 variant (32 groups need ch=128)."""
    config = cifar10.get_config()
    config.data.image_size = 16
    config.model.ch = ch
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (8,)
    config.model.num_groups = num_groups
    return config


def numpy_state_dict(config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors under the release's keys and shapes, with the exact sinusoidal table."""
    rng = np.random.default_rng(seed)
    state = {key: rng.standard_normal(shape, dtype=np.float32)
             for key, shape in release_shapes(config).items()}
    state[TIME_TABLE_KEY] = np.asarray(timestep_embedding(
        jnp.arange(config.diffusion.num_timesteps), config.model.ch))
    return state


def _leaves(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(entry.key for entry in path): leaf for path, leaf in flat}


def _hwio(a):
    return np.transpose(a, (2, 3, 1, 0))


# --- without torch ---------------------------------------------------------------------------


def test_release_keys_and_shapes_for_cifar10():
    """Spot checks written from the release's slimmable_model.py, and its parameter count."""
    shapes = release_shapes(cifar10.get_config())
    assert len(shapes) == 329
    assert sum(int(np.prod(s)) for s in shapes.values()) == 35_746_307 + 1000 * 128
    expected = {
        "time_embedding.timembedding.0.weight": (1000, 128),  # the frozen nn.Embedding table
        "time_embedding.timembedding.1.weight": (512, 128),
        "time_embedding.timembedding.3.weight": (512, 512),
        "head.weight": (128, 3, 3, 3),
        "downblocks.0.block1.0.weight": (128,),
        "downblocks.0.block1.2.weight": (128, 128, 3, 3),
        "downblocks.0.temb_proj.1.weight": (128, 512),
        "downblocks.0.block2.3.weight": (128, 128, 3, 3),
        "downblocks.2.main.weight": (128, 128, 3, 3),  # DownSample
        "downblocks.3.shortcut.weight": (256, 128, 1, 1),
        "downblocks.3.attn.group_norm.weight": (256,),
        "downblocks.3.attn.proj_q.weight": (256, 256, 1, 1),
        "middleblocks.0.attn.proj.bias": (256,),
        "upblocks.8.block1.2.weight": (256, 512, 3, 3),  # [h, skip] concatenated
        "upblocks.8.attn.proj_v.weight": (256, 256, 1, 1),
        "upblocks.11.main.weight": (256, 256, 3, 3),  # UpSample
        "upblocks.12.block1.2.weight": (128, 384, 3, 3),
        "upblocks.14.shortcut.weight": (128, 256, 1, 1),
        "tail.0.weight": (128,),
        "tail.2.weight": (3, 128, 3, 3),
    }
    assert {key: shapes.get(key) for key in expected} == expected
    assert not any(key.startswith(("middleblocks.1.attn", "downblocks.0.attn", "upblocks.0.attn"))
                   for key in shapes)
    assert "downblocks.4.shortcut.weight" not in shapes  # in == out: nn.Identity


def test_convert_fills_every_leaf_once_with_the_transposed_release_tensor():
    config = cifar10.get_config()
    state = numpy_state_dict(config)
    params = convert_state_dict(state, config)
    _, abstract = abstract_network(config)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(abstract)
    ours, wanted = _leaves(params), _leaves(abstract)
    assert {p: (a.shape, a.dtype) for p, a in ours.items()} == {
        p: (a.shape, a.dtype) for p, a in wanted.items()}
    used = [release_key(path) for path in ours]
    assert sorted(used) == sorted(set(state) - {TIME_TABLE_KEY})  # each release tensor once
    transpose = {4: _hwio, 2: np.transpose, 1: lambda a: a}
    for path, leaf in ours.items():
        source = state[release_key(path)]
        np.testing.assert_array_equal(leaf, transpose[source.ndim](source), err_msg=str(path))
    # The same, by names written out independently.
    np.testing.assert_array_equal(params["up"][8]["conv1"]["kernel"],
                                  _hwio(state["upblocks.8.block1.2.weight"]))
    np.testing.assert_array_equal(params["down"][3]["attn"]["q"]["kernel"],
                                  _hwio(state["downblocks.3.attn.proj_q.weight"]))
    np.testing.assert_array_equal(params["temb_dense0"]["kernel"],
                                  state["time_embedding.timembedding.1.weight"].T)
    np.testing.assert_array_equal(params["mid"][0]["norm2"]["scale"],
                                  state["middleblocks.0.block2.0.weight"])
    np.testing.assert_array_equal(params["tail_conv"]["bias"], state["tail.2.bias"])


def test_convert_names_unknown_missing_and_misshaped_keys_and_a_foreign_table():
    config = small_config()
    state = numpy_state_dict(config)
    convert_state_dict(state, config)  # the untouched dict converts

    extra = {**state, "downblocks.9.block1.2.weight": np.zeros((1,), np.float32)}
    with pytest.raises(ValueError, match=r"1 unknown keys \[downblocks\.9\.block1\.2\.weight\]"):
        convert_state_dict(extra, config)
    missing = {k: v for k, v in state.items() if not k.startswith("upblocks.1.attn.")}
    with pytest.raises(ValueError, match=r"0 unknown keys.*10 missing keys \[upblocks\.1\.attn"):
        convert_state_dict(missing, config)
    misshaped = {**state, "head.weight": state["head.weight"][:, :, :2]}
    with pytest.raises(ValueError, match=r"head\.weight \(64, 3, 2, 3\) != \(64, 3, 3, 3\)"):
        convert_state_dict(misshaped, config)
    halves = state[TIME_TABLE_KEY].reshape(1000, -1, 2).transpose(0, 2, 1).reshape(1000, -1)
    with pytest.raises(ValueError, match="interleaved sin/cos"):
        convert_state_dict({**state, TIME_TABLE_KEY: halves}, config)  # [sin..., cos...] layout
    # Another architecture (attention at 16x16 instead of 8x8) is refused by its keys.
    other = small_config()
    other.model.attn_resolutions = (16,)
    with pytest.raises(ValueError, match="attn_resolutions"):
        convert_state_dict(state, other)


def test_load_without_torch_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch"):
        load_release_checkpoint(tmp_path / "ckpt.pt")


# --- with torch ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason=TORCH_REASON)


@pytest.fixture(scope="module")
def release(torch):
    from tests.torch_release_unet import ReleaseUNet, randomize_

    torch.set_num_threads(1)
    config = small_config()
    model = ReleaseUNet(T=config.diffusion.num_timesteps, ch=config.model.ch, ch_mult=(1, 2),
                        attn=(1,), num_res_blocks=1, groups=config.model.num_groups).eval()
    randomize_(model, seed=0)
    return config, model


def save_release_checkpoint(torch, path: Path, net, ema) -> Path:
    """A file with the release's top-level layout (main.py's `ckpt` dict) after its first step:
    Adam under the warm-up LambdaLR, whose first learning rate is 0, so no weight moves."""
    optim = torch.optim.Adam(net.parameters(), lr=4e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda=lambda step: min(step, 5000) / 5000)
    dense = net.time_embedding.timembedding[1].weight  # a gradient here keeps Adam's state small
    dense.sum().backward()
    optim.step()
    sched.step()
    dense.grad = None
    checkpoint = {"net_model": net.state_dict(), "ema_model": ema.state_dict(),
                  "sched": sched.state_dict(), "optim": optim.state_dict(), "step": 450_000,
                  "x_T": torch.randn(8, 3, 32, 32)}
    torch.save(checkpoint, path)
    return path


def test_release_checkpoint_file_loads_ema_or_net(torch, release, tmp_path):
    from tests.torch_release_unet import randomize_

    config, model = release
    net = copy.deepcopy(model)
    randomize_(net, seed=1)
    path = save_release_checkpoint(torch, tmp_path / "ckpt_450000.pt", net, model)
    ema = load_release_checkpoint(path)
    raw = load_release_checkpoint(path, use_ema=False)
    expected = {k: v.numpy() for k, v in model.state_dict().items()}
    assert ema.keys() == expected.keys() and all(
        np.array_equal(ema[k], expected[k]) and ema[k].dtype == np.float32 for k in expected)
    assert not np.array_equal(raw["head.weight"], ema["head.weight"])
    np.testing.assert_array_equal(raw["head.weight"], net.state_dict()["head.weight"].numpy())
    # The frozen table is an (untrained) parameter of both models.
    np.testing.assert_array_equal(raw[TIME_TABLE_KEY], ema[TIME_TABLE_KEY])
    convert_state_dict(ema, config)

    # nn.DataParallel's `module.` prefix, and a bare state_dict.
    wrapped = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"ema_model": wrapped, "net_model": wrapped}, tmp_path / "dp.pt")
    assert load_release_checkpoint(tmp_path / "dp.pt").keys() == expected.keys()
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    assert load_release_checkpoint(tmp_path / "bare.pt").keys() == expected.keys()


def test_unreadable_or_foreign_files_give_one_line_errors(torch, release, tmp_path):
    _, model = release
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_release_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a zip or a pickle" * 10)
    with pytest.raises(ValueError, match=r"^cannot read .*junk\.pt as a PyTorch") as info:
        load_release_checkpoint(tmp_path / "junk.pt")
    assert "\n" not in str(info.value)
    good = save_release_checkpoint(torch, tmp_path / "good.pt", model, model)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read"):
        load_release_checkpoint(tmp_path / "truncated.pt")
    torch.save({"model": model.state_dict(), "step": 3}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DDSM release checkpoint.*'model', 'step'"):
        load_release_checkpoint(tmp_path / "other.pt")
    torch.save({"net_model": model.state_dict()}, tmp_path / "no_ema.pt")
    with pytest.raises(ValueError, match="has no 'ema_model'"):
        load_release_checkpoint(tmp_path / "no_ema.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list"):
        load_release_checkpoint(tmp_path / "list.pt")


def test_full_size_release_checkpoint_round_trip(torch, tmp_path):
    """The CIFAR-10 supernet (35.9M values with the table) through torch.save and back."""
    from tests.torch_release_unet import ReleaseUNet, randomize_

    config = cifar10.get_config()
    model = ReleaseUNet()  # the release's CIFAR-10 flags: ch 128, (1,2,2,2), attn level 1
    randomize_(model, seed=0)
    # net and EMA share storage (torch.save writes it once): this test is about layout and size.
    path = save_release_checkpoint(torch, tmp_path / "ckpt_450000.pt", model, model)
    state = load_release_checkpoint(path)
    assert {k: v.shape for k, v in state.items()} == release_shapes(config)
    params = convert_state_dict(state, config)
    for leaf_path, leaf in _leaves(params).items():
        source = state[release_key(leaf_path)]
        expected = {4: _hwio, 2: np.transpose, 1: lambda a: a}[source.ndim](source)
        np.testing.assert_array_equal(leaf, expected, err_msg=str(leaf_path))


def test_ema_drift_of_the_frozen_table_is_accepted(torch):
    """The release's EMA also updates the frozen table, x <- 0.9999 x + (1 - 0.9999) x in float32,
    which walks it off the exact sinusoid before it settles; the EMA weights we load carry that."""
    config = small_config()
    state = numpy_state_dict(config)
    exact = torch.tensor(state[TIME_TABLE_KEY])
    drifted = exact.clone()
    for _ in range(3000):
        drifted = drifted * 0.9999 + drifted * (1 - 0.9999)
    drift = float((drifted - exact).abs().max())
    assert 1e-5 < drift < 1e-3, drift
    convert_state_dict({**state, TIME_TABLE_KEY: drifted.numpy()}, config)


def _ours(network, params, x, t, width):
    apply = jax.jit(lambda p, x, t: network.apply(p, x, t, width=width))
    return np.asarray(apply(params, jnp.asarray(x.permute(0, 2, 3, 1).numpy()),
                            jnp.asarray(t.numpy())))


@pytest.fixture(scope="module")
def converted(torch, release):
    config, model = release
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    network, _ = abstract_network(config)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 17, 500, 999])
    return network, convert_state_dict(state, config), x, t


@pytest.mark.parametrize("width", [1.0, 0.75, 0.5, 0.25])
def test_converted_weights_compute_what_the_release_computes(torch, release, converted, width):
    _, model = release
    network, params, x, t = converted
    with torch.no_grad():
        theirs = model(x, t, width=width).permute(0, 2, 3, 1).numpy()
    ours = _ours(network, params, x, t, width)
    scale = np.abs(theirs).max()
    assert scale > 0.5  # random weights give O(1) outputs, so the comparison means something
    assert np.abs(ours - theirs).max() < 1e-4 * scale, np.abs(ours - theirs).max() / scale


def test_converted_weights_match_at_full_width_with_the_release_32_groups(torch):
    from tests.torch_release_unet import ReleaseUNet, randomize_

    config = small_config(ch=32, num_groups=32)
    model = ReleaseUNet(ch=32, ch_mult=(1, 2), attn=(1,), num_res_blocks=1).eval()
    randomize_(model, seed=2)
    model.load_state_dict(model.state_dict(), strict=True)
    params = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, config)
    network, _ = abstract_network(config)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([3, 998])
    with torch.no_grad():
        theirs = model(x, t).permute(0, 2, 3, 1).numpy()
    ours = _ours(network, params, x, t, 1.0)
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(theirs).max()


def test_convert_checkpoint_writes_an_export_with_the_release_schedule(torch, release, tmp_path):
    config, model = release
    path = save_release_checkpoint(torch, tmp_path / "ckpt.pt", model, model)
    report = convert_checkpoint(path, tmp_path / "export", config, schedule=RELEASE_SCHEDULE)
    assert report["source"] == "ema_model" and report["num_params"] == sum(
        v.numel() for k, v in model.state_dict().items() if k != TIME_TABLE_KEY)
    loaded = export.load(tmp_path / "export")
    expected = convert_state_dict({k: v.numpy() for k, v in model.state_dict().items()}, config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(loaded.params), expected)
    # The release's per-t widths become indices in sampling order (t = 999 first).
    per_t = json.loads(RELEASE_SCHEDULE.read_text())["widths_per_timestep"]
    assert list(loaded.schedule.timesteps) == list(range(999, -1, -1))
    np.testing.assert_array_equal(loaded.schedule.width_per_step, per_t[::-1])
    assert np.bincount(loaded.schedule.schedule, minlength=4).tolist() == [274, 181, 534, 11]


def test_cli_reports_a_bad_checkpoint_in_one_line(torch, tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"junk")
    result = subprocess.run(
        [sys.executable, "-m", "ddsm_jax.convert_release", f"--checkpoint={tmp_path / 'junk.pt'}",
         f"--out={tmp_path / 'export'}"],
        check=False, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
        timeout=120)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot read" in errors[0], result.stderr
    assert not (tmp_path / "export").exists()
