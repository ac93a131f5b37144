"""CelebA 64x64 (center crop 140x140, resized to 64, as score_sde does).

Network: the DDIM CelebA-64 U-Net, ch=128, ch_mult=(1,2,2,2,4), two res blocks per level,
attention at 16x16 and in the middle, dropout 0.1. It is the CIFAR-10 network with one more
level for the doubled resolution: 78.7M parameters and 47.8 GFLOPs per image at full width
(`python -m ddsm_jax.cost`; the paper's CelebA model: 49.9 GFLOPs), and every width (0.25 x 128
= 32 channels) still divides GroupNorm's 32 groups. Batch 128, Adam 2e-4, 5k warm-up, EMA
0.9999, 500k steps.

Prepare the data once (on a machine with TensorFlow), then run on a TPU pod slice:

    tfds build celeb_a --data_dir=gs://BUCKET/tfds --file_format=array_record
    launch/tpu_pod.sh --name=ddsm-celeba --zone=us-west4-a --type=v5litepod-16 \
        --config=configs/celeba.py --workdir=gs://BUCKET/ddsm/celeba \
        -- --config.data.data_dir=gs://BUCKET/tfds
"""

from ddsm_jax.configs.base import base_config


def get_config():
    config = base_config()
    config.data.name = "celeb_a"
    config.data.image_size = 64
    config.data.channels = 3
    config.data.random_flip = True

    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1

    config.training.batch_size = 128
    config.training.num_steps = 500_000
    config.training.learning_rate = 2e-4
    config.sampling.batch_size = 64
    return config
