"""`python -m ddsm_jax.mix --config=configs/digits.py --workdirs=A,B --workdir=DIR`: one schedule
over the branches of several trained networks.

Loads each workdir's latest weights (ddsm, adadiff or continuous_unet runs on the config's data
and noise schedule), searches a branch per sampling step over all of them together
(`DIR/search/`, the config's search settings) and evaluates the mixture like any run
(`DIR/eval/metrics.json`: every branch alone, the chosen schedule, the costliest branch with
fewer steps, and the members' training MACs summed), so that `ddsm_jax.compare` puts it beside
its members. `--mode=search` or `evaluate` runs one of the two.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddsm_jax.utils.cli import run_program

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file: the data, sampling, search and evaluation settings.",
    lock_config=True)
_WORKDIRS = flags.DEFINE_list("workdirs", None, "Trained workdirs whose networks are mixed, "
                              "at least two; where two branches cost the same MACs the one of "
                              "the workdir named first is kept.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the mixture's search and "
                               "evaluation.")
_MODE = flags.DEFINE_enum("mode", "all", ["search", "evaluate", "all"], "Stage to run.")


def mixture_config(config, workdirs: list[str]):
    """`config` as the mixture's: strategy "mixed", and `mix.workdirs` naming its members."""
    import ml_collections

    mixed = ml_collections.ConfigDict(config.to_dict())
    mixed.strategy = "mixed"
    mixed.mix = ml_collections.ConfigDict({"workdirs": list(workdirs)})
    return mixed


def load_members(config, workdirs: list[str]):
    """Every workdir's trained network as a `Member`, after checking they can mix."""
    import ml_collections
    from etils import epath

    from ddsm_jax.layout import Workdir
    from ddsm_jax.strategies.mixed import Member, check_mixable
    from ddsm_jax.training.train import load_trained
    from ddsm_jax.utils.files import read_json

    configs = []
    for workdir in workdirs:
        recorded = Workdir(workdir).config
        if not recorded.is_file():
            raise FileNotFoundError(f"{workdir} has no config.json: train it first "
                                    f"(python -m ddsm_jax.main --mode=train)")
        configs.append(ml_collections.ConfigDict(read_json(recorded)))
        check_mixable(config, configs[-1], workdir)
    names = [epath.Path(w).name for w in workdirs]
    if len(set(names)) < len(names):  # labels must tell the members apart
        names = [str(w) for w in workdirs]
    members, steps = [], []
    for name, member_config, workdir in zip(names, configs, workdirs):
        result = load_trained(member_config, workdir)
        members.append(Member(name, result.network, result.state.ema_params))
        steps.append(int(result.state.step))
    return members, configs, steps


def run(config, workdirs: list[str], workdir: str, mode: str) -> None:
    from ddsm_jax.diffusion.schedules import diffusion_from_config
    from ddsm_jax.eval.evaluate import evaluate
    from ddsm_jax.layout import Workdir
    from ddsm_jax.models.cost import reference_macs
    from ddsm_jax.provenance import check_made_from, weights_id
    from ddsm_jax.sampling import ScheduleSampler
    from ddsm_jax.search.search import EvolutionarySearch
    from ddsm_jax.strategies.mixed import mix
    from ddsm_jax.utils.files import check_storage, read_json, write_text_atomically
    from ddsm_jax.utils.lock import WorkdirLock
    from ddsm_jax.width_schedule import find_schedule

    if len(workdirs) < 2:
        raise ValueError(f"--workdirs names {len(workdirs)} workdir: a mixture needs at least two")
    check_storage(workdir)
    layout = Workdir(workdir)
    if layout.config.is_file():  # never mix two mixtures' results in one workdir
        before = read_json(layout.config).get("mix", {}).get("workdirs")
        if before != list(workdirs):
            held = f"the mixture of {','.join(before)}" if before else "another run"
            raise ValueError(f"{workdir} holds {held}: give the mixture of "
                             f"{','.join(workdirs)} its own --workdir")
    mixed_config = mixture_config(config, workdirs)
    members, member_configs, steps = load_members(config, workdirs)
    network, params, dropped = mix(members, reference_macs(config))
    for label in dropped:
        print(f"note: {label} costs the MACs of a branch of an earlier workdir; kept that one",
              file=sys.stderr)
    diffusion = diffusion_from_config(config.diffusion)
    weights = weights_id(max(steps), params)
    with WorkdirLock(layout.root):
        _share_classifier(workdirs[0], layout)
        search = (EvolutionarySearch(mixed_config, layout.root, network, diffusion, params,
                                     weights=weights)  # checks the search settings
                  if mode in ("search", "all") else None)
        write_text_atomically(layout.config, mixed_config.to_json_best_effort(indent=2))
        print(json.dumps({"branches": dict(zip(map(str, network.widths), network.labels))}),
              flush=True)
        if search is not None:
            schedule = search.run()
            print(json.dumps({"stage": "search", "schedule": str(layout.schedule),
                              **{k: schedule.figures[k] for k in ("fd", "macs_ratio")}}),
                  flush=True)
        if mode in ("evaluate", "all"):
            sampler = ScheduleSampler(network, diffusion, config.sampling)
            schedule = find_schedule(None, layout.root, widths=network.widths,
                                     sampler=sampler.method, timesteps=sampler.timesteps)
            if schedule is not None:
                check_made_from(layout.schedule, schedule.figures.get("weights"), weights,
                                "run the mixture's search again (--mode=search or all)")
            metrics = evaluate(mixed_config, layout.root, network, diffusion, params,
                               schedule=schedule, weights=weights,
                               training=_training_cost(config, member_configs, members))
            print(json.dumps({"stage": "evaluate", "metrics": str(layout.eval_metrics),
                              **{k: metrics[k] for k in ("full", "schedule") if k in metrics}}),
                  flush=True)


def _training_cost(config, member_configs, members) -> dict[str, float]:
    """Every member's training MACs summed, and their ratio to the full U-Net trained alone on
    as many images."""
    from ddsm_jax.models.cost import reference_macs
    from ddsm_jax.training.curriculum import FORWARD_AND_BACKWARD, training_macs

    costs = [training_macs(c, m.network, m.params) for c, m in zip(member_configs, members)]
    images, macs = sum(c["images"] for c in costs), sum(c["macs"] for c in costs)
    return {"images": images, "macs": macs,
            "macs_ratio": macs / (FORWARD_AND_BACKWARD * images * reference_macs(config))}


def _share_classifier(source: str, layout) -> None:
    """The first member's digits classifier, copied so the mixture is judged by the very network
    its members were (training it again would cost a minute and give the same weights)."""
    from ddsm_jax.layout import Workdir
    from ddsm_jax.utils.files import write_atomically

    cached = Workdir(source).classifier
    if not cached.is_dir() or layout.classifier.exists():
        return
    layout.classifier.mkdir(parents=True, exist_ok=True)
    for path in cached.iterdir():
        data = path.read_bytes()
        write_atomically(layout.classifier / path.name, lambda handle, data=data: handle.write(data))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from ddsm_jax.utils.compilation_cache import enable_compilation_cache
    from ddsm_jax.utils.errors import quiet_background_failures

    enable_compilation_cache()
    logging.set_verbosity(logging.WARNING)
    quiet_background_failures()
    try:
        run(_CONFIG.value, _WORKDIRS.value, _WORKDIR.value, _MODE.value)
    except (ValueError, OSError, FloatingPointError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    run_program(main, required=["config", "workdirs", "workdir"])
