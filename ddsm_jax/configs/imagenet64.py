"""ImageNet 64x64 (tfds `imagenet_resized/64x64`), unconditional.

Network: the improved-DDPM ImageNet-64 U-Net, ch=128, ch_mult=(1,2,3,4), three res blocks per
level, attention at 16x16 and 8x8 and in the middle, no dropout: ImageNet's 1.28M images need
the capacity more than the regularisation: 115.9M parameters and 78.7 GFLOPs per image (the
paper's ImageNet model: 82.1 GFLOPs). Batch 512, Adam 1e-4, EMA 0.9999, 1.5M steps, FSDP over 4
devices.

    tfds build imagenet_resized/64x64 --data_dir=gs://BUCKET/tfds --file_format=array_record
    launch/tpu_pod.sh --name=ddsm-in64 --zone=us-west4-a --type=v5litepod-64 \
        --config=configs/imagenet64.py --workdir=gs://BUCKET/ddsm/imagenet64 \
        -- --config.data.data_dir=gs://BUCKET/tfds
"""

from ddsm_jax.configs.base import base_config


def get_config():
    config = base_config()
    config.data.name = "imagenet64"
    config.data.image_size = 64
    config.data.channels = 3
    config.data.random_flip = True

    config.model.ch = 128
    config.model.ch_mult = (1, 2, 3, 4)
    config.model.num_res_blocks = 3
    config.model.attn_resolutions = (16, 8)
    config.model.dropout = 0.0

    config.mesh.fsdp = 4

    config.training.batch_size = 512
    config.training.num_steps = 1_500_000
    config.training.learning_rate = 1e-4
    config.sampling.batch_size = 64
    return config
