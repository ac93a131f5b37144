"""Defaults shared by every data set's config; each config file overrides what differs."""

import ml_collections
from ml_collections import config_dict


def base_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.name = "digits"
    config.data.image_size = 8
    config.data.channels = 1
    config.data.eval_fraction = 0.1
    config.data.split_seed = 0
    config.data.random_flip = False
    # Root of prepared data sets (tfds ArrayRecord builds, image folders such as afhq/); local or
    # gs://. Unset: tfds's default ($TFDS_DATA_DIR or ~/tensorflow_datasets). Embedded sets ignore it.
    config.data.data_dir = config_dict.placeholder(str)

    config.model = ml_collections.ConfigDict()
    config.model.ch = 128
    config.model.ch_mult = (1, 2, 2, 2)
    config.model.num_res_blocks = 2
    config.model.attn_resolutions = (16,)
    config.model.dropout = 0.1
    config.model.num_groups = 32
    config.model.widths = (1.0, 0.75, 0.5, 0.25)
    # A width per U-Net stage (encoder, middle, decoder) for each sampling step, instead of one
    # for the whole network: the global widths and every mix of two neighbouring ones are the
    # branches the sandwich trains and the search chooses from (ddsm_jax/models/stage_widths.py).
    config.model.stage_widths = False
    config.model.dtype = "float32"  # compute dtype: 'float32' | 'bfloat16' (TPU/GPU; params stay f32)
    config.model.remat = False  # recompute residual blocks in the backward pass (saves memory)

    # The step-aware method (docs/strategies.md): 'ddsm', one slimmable U-Net with a searched
    # width per sampling step; 'multistage' (Zhang, Lu et al., arXiv 2312.09181), a shared
    # encoder with one decoder per timestep stage, each of its own size; 'step_adaptive' (Li et
    # al., arXiv 2312.13307), one model per timestep group pruned from a base model; 'adadiff'
    # (Tang et al., arXiv 2309.17074), early exits in the decoder; 'continuous_unet'
    # (Calvo-Ordoñez et al., arXiv 2310.20092), neural-ODE blocks with searched solver steps.
    config.strategy = "ddsm"
    config.multistage = ml_collections.ConfigDict()
    # Decoder base channels as fractions of model.ch, one per stage, low noise to high. The
    # paper's CIFAR-10 decoders: 192, 128 and 16 channels beside an encoder of 128.
    config.multistage.decoder_ratios = (1.5, 1.0, 0.125)
    # The first timestep of stages 2..K. The paper's CIFAR-10 stages (VP t = 0.442, 0.6308);
    # a data set's own come from `ddsm_jax.strategies.stage_split.stage_boundaries`.
    config.multistage.boundaries = (442, 631)
    # Empty: each decoder trains and samples at its own size only (the paper's method). Widths
    # such as (1.0, 0.5, 0.25): the decoders are slimmable, each batch trains its stage's decoder
    # at a sandwich of them, and the search chooses a decoder width per sampling step.
    config.multistage.decoder_widths = ()

    # Step-Adaptive Training. Its paper leaves the grouping, the difficulty and the pruning proxy
    # unstated; ours (ddsm_jax/strategies/step_adaptive.py, docs/strategies.md): `training`
    # trains the base model (one full-width U-Net, in WORKDIR/base); the sampler's timesteps are
    # split into groups by log-SNR; each group's difficulty is the base model's loss on its
    # timesteps; widths from model.widths are given monotone in difficulty under the MACs
    # budget; each group's model is the base model with its channels reordered by Taylor
    # importance on the group's timesteps, cut to that width and fine-tuned on the group alone.
    config.step_adaptive = ml_collections.ConfigDict()
    config.step_adaptive.num_groups = 4
    config.step_adaptive.macs_budget = 0.8  # mean MACs per sampling step / full width's
    config.step_adaptive.difficulty = "loss"  # 'loss' (base model's) | 'snr' (noisier is harder)
    config.step_adaptive.probe_images = 512  # training images per group for loss and importance
    config.step_adaptive.finetune_steps = 20000  # batches over all groups, one group per batch
    config.step_adaptive.finetune_learning_rate = 2e-5
    # Set by the base phase (written to WORKDIR/step_groups.json); give both to fix them.
    config.step_adaptive.boundaries = ()
    config.step_adaptive.group_widths = ()

    # AdaDiff (Tang et al., arXiv 2309.17074): exits after decoder residual blocks
    # (ddsm_jax/models/early_exit_unet.py), trained jointly with the network by the paper's
    # uncertainty-aware layer-wise loss, L_simple + uncertainty_weight * sum_i (u_i - tanh|e_i|)^2
    # + layer_weight * sum_i sg(1 - u_i) |e_i|^2 + plain_layer_weight * sum_i |e_i|^2 (e_i: exit
    # i's error; the last, unweighted term is the public reproduction's guard against exits
    # that learn nothing). A branch is an exit depth: the fraction of the decoder's residual
    # blocks run, searched per step as DDSM's widths are; the paper's own sampling exits each
    # sample at the first exit whose uncertainty is under a threshold (`thresholds`, evaluated
    # as a front).
    config.adadiff = ml_collections.ConfigDict()
    config.adadiff.exit_depths = (1.0, 0.75, 0.5, 0.25)
    config.adadiff.uncertainty_weight = 1.0
    config.adadiff.layer_weight = 1.0
    config.adadiff.plain_layer_weight = 1.0
    config.adadiff.thresholds = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)  # sampling only: any checkpoint

    # The Missing U (Calvo-Ordoñez et al., arXiv 2310.20092): a U-Net of neural-ODE blocks
    # (ddsm_jax/models/continuous_unet.py), its own channels (the paper's nf = 16 and levels of
    # 2, 4, 8, 16 nf); model.attn_resolutions and model.num_groups as the U-Net's. A branch is
    # the fraction of max_solver_steps RK4 steps every block takes: trained as DDSM's sandwich,
    # searched per sampling step (the paper's network: one step, 4 evaluations per block).
    config.continuous_unet = ml_collections.ConfigDict()
    config.continuous_unet.ch = 16
    config.continuous_unet.ch_mult = (2, 4, 8, 16)
    config.continuous_unet.max_solver_steps = 2
    config.continuous_unet.solver_fractions = (1.0, 0.5)

    config.diffusion = ml_collections.ConfigDict()
    config.diffusion.num_timesteps = 1000
    config.diffusion.beta_schedule = "linear"
    config.diffusion.beta_start = 1e-4
    config.diffusion.beta_end = 0.02

    # Device mesh: `data` replicates parameters, `fsdp` shards them; the batch is split over both.
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1  # every device that fsdp leaves
    config.mesh.fsdp = 1

    config.training = ml_collections.ConfigDict()
    config.training.batch_size = 128
    # Images per forward/backward pass, gradients averaged over the batch's microbatches (0: the
    # whole batch). For batches that do not fit in memory; a multiple of the device count.
    config.training.microbatch_size = 0
    # CPU only: how XLA:CPU orders the step's operations. 'memory' runs them one after another
    # (each already uses every core); 'concurrency', XLA's default, side by side, which took 1-3%
    # longer at CIFAR-10 (benchmarks.train_step --cpu_schedulers=memory,concurrency; README).
    config.training.cpu_scheduler = "memory"
    config.training.num_steps = 450_000
    config.training.learning_rate = 2e-4
    config.training.warmup_steps = 5000
    config.training.grad_clip = 1.0
    config.training.ema_decay = 0.9999
    config.training.log_every = 50
    config.training.checkpoint_every = 5000
    config.training.keep_checkpoints = 3
    config.training.sample_every = 0  # sample grids per width every K steps (0: only at the end)
    # In-place distillation (BigNAS, OFA): the narrower widths of a sandwich learn a target this
    # far from the noise towards the full width's (stop-gradient) prediction of the same noisy
    # batch; 0 is the paper's sandwich (each width its own t and noise), 1 the teacher alone.
    config.training.distillation = 0.0
    # With model.stage_widths: the share of steps whose sandwich middle is a global width (the
    # others train a mix of stage widths); 0 draws among all middles alike, so each global
    # middle trains 1 step in 20 instead of 1 in 2.
    config.training.global_middles = 0.0

    config.sampling = ml_collections.ConfigDict()
    config.sampling.method = "ddpm"  # 'ddpm' | 'ddim'
    config.sampling.num_steps = 1000  # DDIM steps; DDPM always runs all T steps
    config.sampling.spacing = "uniform"  # DDIM timestep spacing: 'uniform' | 'quadratic'
    config.sampling.eta = 0.0
    config.sampling.variance = "fixedlarge"  # DDPM: 'fixedlarge' (the release) | 'fixedsmall'
    config.sampling.clip_denoised = False
    config.sampling.num_samples = 64
    config.sampling.batch_size = 64

    config.eval = ml_collections.ConfigDict()
    config.eval.num_samples = 50_000  # per entry (full, each uniform width, the schedule)
    config.eval.features = "auto"  # 'auto': 'domain' for digits/mnist, else 'inception'
    # The FID Inception weights as .npz (python -m ddsm_jax.eval.convert_inception; README).
    config.eval.inception_weights = config_dict.placeholder(str)
    # Published pytorch-fid statistics (.npz with mu, sigma); unset: computed from the training
    # split (up to num_reference images) and cached in the workdir, which also gives KID.
    config.eval.reference_stats = config_dict.placeholder(str)
    config.eval.num_reference = 50_000
    config.eval.feature_batch_size = 200
    config.eval.kid_subsets = 100
    config.eval.kid_subset_size = 1000
    # A schedule.json to evaluate and export; unset: DIR/search/schedule.json if it exists.
    config.eval.schedule = config_dict.placeholder(str)

    # Step-aware search (DDSM: NSGA-II, population 50, 10 generations, FID of 4096 samples
    # + 0.001 * mean MMACs). The schedule is searched for `config.sampling` as it is set.
    config.search = ml_collections.ConfigDict()
    config.search.objective = "weighted"  # 'weighted' | 'budget' | 'pareto'
    config.search.macs_lambda = 0.001  # weighted: FD + macs_lambda * mean MMACs per step
    config.search.macs_budget = 0.5  # budget: best FD with MACs <= this fraction of full width
    config.search.fd_tolerance = 0.05  # pareto: cheapest front member with FD <= 1.05 x full's
    # What a schedule costs to the budget and Pareto objectives: 'macs' (counted, the paper's) or
    # 'seconds' (each branch timed on this machine at sampling.batch_size, median of
    # timing_repeats; cached in DIR/search/branch_seconds.json), against full compute's.
    config.search.cost = "macs"
    config.search.seconds_budget = 0.5  # budget with cost 'seconds': time <= this x full's
    config.search.timing_repeats = 5
    config.search.population_size = 50
    config.search.generations = 10
    config.search.num_samples = 4096  # per candidate, the same noise for every candidate
    config.search.num_piecewise = 8  # piecewise-constant seeds beside the uniform widths
    config.search.tournament_size = 2
    config.search.crossover_rate = 0.9
    config.search.max_cut_points = 3
    config.search.gene_mutation_rate = config_dict.placeholder(float)  # default 2 / num_steps
    config.search.block_mutation_rate = 0.4
    config.search.shift_mutation_rate = 0.3
    config.search.share_prefixes = True  # compute shared schedule prefixes once
    # Memory for the population's trajectory states (on the host; one generation's worth also on
    # the devices), from which children start at the longest prefix they share with a parent
    # (0 = off; more memory keeps the states of more steps).
    config.search.trajectory_cache_mb = 1024
    # The fraction of each generation's children sampled: those a surrogate (ridge regression
    # of log FD on the width of every step, fitted to every schedule scored) ranks best; 1: all.
    config.search.surrogate_keep = 1.0
    # 'fixed': widths on the sampler's timesteps (the paper's); 'searched': each schedule also
    # chooses which sampling.num_steps of the T timesteps DDIM visits (genome: widths, then
    # timesteps; the uniform widths on the config's grid stay in as the baselines).
    config.search.timesteps = "fixed"
    # The best of many noisy scores is optimistic: the shortlist is scored again, with full width,
    # on fresh noise and more samples, and the choice is made on those scores (0 = don't).
    config.search.validation_samples = 10000
    config.search.validation_candidates = 8
    # Members of the front, spread over MACs, also validated (with every uniform width): the
    # choice of price an export offers at sampling time (`python -m ddsm_jax.sample --budget`).
    config.search.validation_front = 8

    config.export = ml_collections.ConfigDict()
    config.export.num_samples = 50_000  # samples.npz, the input of guided-diffusion's evaluator
    return config
