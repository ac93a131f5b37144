"""CIFAR-10 32x32: the DDPM CIFAR-10 U-Net (35,746,307 parameters) as DDSM's supernet.

ch=128, ch_mult=(1,2,2,2), two res blocks per level, attention at 16x16 and in the middle,
dropout 0.1, T=1000 linear betas; batch 256, Adam 4e-4 with 5k warm-up, EMA 0.9999, 450k steps.

    tfds build cifar10 --data_dir=gs://BUCKET/tfds --file_format=array_record
    launch/tpu_pod.sh --name=ddsm-cifar10 --zone=us-west4-a --type=v5litepod-16 \
        --config=configs/cifar10.py --workdir=gs://BUCKET/ddsm/cifar10 \
        -- --config.data.data_dir=gs://BUCKET/tfds

On one machine: python -m ddsm_jax.main --config=configs/cifar10.py --workdir=DIR
"""

from ddsm_jax.configs.base import base_config


def get_config():
    config = base_config()
    config.data.name = "cifar10"
    config.data.image_size = 32
    config.data.channels = 3
    config.data.random_flip = True

    config.training.batch_size = 256
    config.training.learning_rate = 4e-4
    return config
