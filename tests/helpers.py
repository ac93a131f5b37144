"""Tiny configs derived from the real ones, so tests exercise the same code paths quickly."""

from configs import digits


def tiny_config(num_steps: int = 8, **model_overrides):
    config = digits.get_config()
    config.model.ch = 32
    config.model.ch_mult = (1, 2)
    config.model.num_res_blocks = 1
    config.model.attn_resolutions = (4,)
    config.model.num_groups = 4
    config.training.batch_size = 16
    config.training.num_steps = num_steps
    config.training.warmup_steps = 2
    config.training.log_every = 2
    config.training.checkpoint_every = 4
    config.sampling.num_steps = 10
    config.sampling.num_samples = 8
    config.sampling.batch_size = 8
    for name, value in model_overrides.items():
        config.model[name] = value
    return config
