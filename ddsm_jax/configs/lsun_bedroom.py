"""LSUN bedroom 256x256 (shorter side resized to 256, center crop).

Network: the DDPM LSUN-256 U-Net, ch=128, ch_mult=(1,1,2,2,4,4), two res blocks per level,
attention at 16x16 and in the middle, no dropout (LSUN is large enough not to overfit): 113.7M
parameters, 496 GFLOPs per image. Batch 64, Adam 2e-5 (DDPM's rate for 256x256), EMA 0.9999,
2.4M steps (as DDPM); FSDP over 4 devices keeps the optimizer state per chip small.

    tfds build lsun/bedroom --data_dir=gs://BUCKET/tfds --file_format=array_record
    launch/tpu_pod.sh --name=ddsm-lsun --zone=us-west4-a --type=v5litepod-32 \
        --config=configs/lsun_bedroom.py --workdir=gs://BUCKET/ddsm/lsun_bedroom \
        -- --config.data.data_dir=gs://BUCKET/tfds
"""

from ddsm_jax.configs.base import base_config


def get_config():
    config = base_config()
    config.data.name = "lsun/bedroom"
    config.data.image_size = 256
    config.data.channels = 3
    config.data.random_flip = True

    config.model.ch = 128
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.0

    config.mesh.fsdp = 4

    config.training.batch_size = 64
    config.training.num_steps = 2_400_000
    config.training.learning_rate = 2e-5
    config.sampling.batch_size = 16
    return config
