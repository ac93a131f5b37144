"""The embedded default: scikit-learn's 1,797 real 8x8 handwritten digits, trained on a CPU.

A small slimmable U-Net (8x8 -> 4x4 with attention at 4x4) sized so that the whole run fits in
about ten minutes on two CPU cores; 4 GroupNorm groups so that the 0.25 width still divides.

    python -m ddsm_jax.main --config=configs/digits.py --workdir=/tmp/ddsm_digits

`configs/digits.py:tiny` is the same network, data and stages, shrunk to a first result in about
a minute (fewer steps, samples and generations); the tests derive their configs from it:

    python -m ddsm_jax.main --config=configs/digits.py:tiny --workdir=/tmp/ddsm_tiny --mode=all
"""

from ddsm_jax.configs.base import base_config


def get_config(variant: str = ""):
    config = base_config()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1

    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.dropout = 0.0
    config.model.num_groups = 4

    # --config.strategy=multistage: decoders of 48, 32 and 8 channels (8 is the narrowest that
    # 4 GroupNorm groups allow), and the stages the optimal-denoiser clustering finds on these
    # digits (tests/test_stage_split.py recomputes them).
    config.multistage.decoder_ratios = (1.5, 1.0, 0.25)
    config.multistage.boundaries = (126, 176)

    # --config.strategy=step_adaptive: its base model is the plain 2,000-step U-Net (the same
    # weights as --config.model.widths="(1.0,)"), then 1,000 fine-tuning batches over its four
    # groups.
    config.step_adaptive.finetune_steps = 1000
    config.step_adaptive.finetune_learning_rate = 2e-4

    # --config.strategy=continuous_unet: levels of 16 and 32 channels, half the U-Net's (the
    # paper's nf = 16 network beside DDPM's ch = 128 one has a quarter to all of its channels).
    config.continuous_unet.ch = 8
    config.continuous_unet.ch_mult = (2, 4)

    config.training.batch_size = 64
    config.training.num_steps = 2000
    config.training.learning_rate = 1e-3
    config.training.warmup_steps = 100
    config.training.ema_decay = 0.995
    config.training.log_every = 50
    config.training.checkpoint_every = 500

    # Stochastic DDIM (eta = 1: DDPM's noise, 20 of its 1000 steps). Fresh noise at every step
    # washes out the small errors of a narrow network, as in the paper's DDPM sampling; with
    # deterministic DDIM (eta = 0) they compound, and full width is also worse here.
    config.sampling.method = "ddim"
    config.sampling.num_steps = 20
    config.sampling.eta = 1.0
    config.sampling.num_samples = 100
    config.sampling.batch_size = 100

    config.eval.num_samples = 1000
    config.export.num_samples = 1000

    # The reproduction target: half of full width's MACs at full width's FD.
    config.search.objective = "budget"
    config.search.macs_budget = 0.5
    config.search.population_size = 16
    config.search.generations = 8
    config.search.num_samples = 256
    config.search.num_piecewise = 6
    config.search.validation_samples = 1000
    if variant == "tiny":
        return tiny(config)
    if variant:
        raise ValueError(f"unknown variant {variant!r} of configs/digits.py; use '' or 'tiny'")
    return config


def tiny(config):
    """The one-minute run: a few hundred steps, ten sampling steps, hundreds of samples."""
    config.training.batch_size = 32
    config.training.num_steps = 120
    config.training.learning_rate = 2e-3
    config.training.warmup_steps = 20
    config.training.ema_decay = 0.98
    config.training.log_every = 20
    config.training.checkpoint_every = 120
    config.step_adaptive.num_groups = 2  # one compiled fine-tuning step per group
    config.step_adaptive.finetune_steps = 40
    config.step_adaptive.probe_images = 64

    config.sampling.num_steps = 10
    config.sampling.num_samples = 16
    config.sampling.batch_size = 100

    config.eval.num_samples = 200
    config.export.num_samples = 100

    config.search.population_size = 8
    config.search.generations = 2
    config.search.num_samples = 64
    config.search.num_piecewise = 2
    config.search.validation_samples = 200
    config.search.validation_candidates = 2
    config.search.validation_front = 3
    return config
