"""AFHQ (cats, dogs, wild animals) at 64x64, from an image folder.

AFHQ ships as JPEG folders, not as a tfds data set: put them at
`<data_dir>/afhq/{train,val}/<class>/*.jpg`. 64x64 keeps the run the size of the CelebA one and
uses the same network (ch=128, ch_mult=(1,2,2,2,4), attention at 16x16, dropout 0.1): with only
~15k training images, dropout matters. For 256x256, take the network of configs/lsun_bedroom.py.

    launch/tpu_pod.sh --name=ddsm-afhq --zone=us-west4-a --type=v5litepod-16 \
        --config=configs/afhq.py --workdir=gs://BUCKET/ddsm/afhq \
        -- --config.data.data_dir=gs://BUCKET/data
"""

from ddsm_jax.configs import celeba


def get_config():
    config = celeba.get_config()
    config.data.name = "afhq"
    config.training.num_steps = 300_000
    return config
