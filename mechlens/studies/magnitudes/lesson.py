"""Study 4's lesson: the notebook and experiment script, part by part (:mod:`mechlens.studies.magnitudes`)."""

from __future__ import annotations

from mechlens.studies import Step

# -- the lesson ----------------------------------------------------------------------------------------

LESSON = (
    Step(
        "Set up: configuration, model and texts",
        "The study's configuration (`magnitudes.Config`; its fields are the `mechlens run magnitudes` flags), "
        'the embedded `tiny-gpt2` (offline; `gpt2-large` with `data="rotten_tomatoes"` reproduces the '
        "original online) and the texts as a stream of `(global index, text)` pairs: any source streams "
        "(a local `.txt`/`.jsonl`/`.csv`/`.parquet` file, `hf:REPO:SPLIT`), tokenised one batch at a time, "
        "so memory does not grow with the corpus. Conventions that differ from the original notebook: BOS "
        "is prepended (`bos=False` to switch), position 0 is excluded from every statistic "
        "(`exclude_first=False`), texts keep their first 128 tokens (`max_tokens`). Statistics key on the "
        "model's position ids, so the padding side changes nothing.",
        'config = magnitudes.Config(data="reviews", n_texts=64, padding_side="right")\n'
        'model = load_model("tiny-gpt2")  # or "gpt2-large" online, with data="rotten_tomatoes"\n'
        "texts = magnitudes.corpus(config)  # (global index, text) pairs, read lazily\n"
        "config",
    ),
    Step(
        "Part 1: attention-output norms by layer and position",
        "`attn_out_norms` caches only `blocks.{l}.hook_attn_out`, one mini-batch at a time, and reduces the "
        "L2 norms at once to sums of constant size: means by layer and position, a histogram per layer, and "
        "percentiles of the log-norms per layer from a seeded sample of at most `token_reservoir` tokens "
        "(exact here: the sample holds every token). Look for the layers whose attention writes the largest "
        "vectors, how wide each layer's distribution is (5th to 95th percentile), and whether early "
        "positions stand out in the heatmap.",
        "norms = magnitudes.attn_out_norms(\n"
        "    model,\n"
        "    texts,\n"
        "    bos=config.bos,\n"
        "    max_tokens=config.max_tokens,\n"
        "    exclude_first=config.exclude_first,\n"
        "    batch_size=config.batch_size,\n"
        "    n_token_samples=config.token_reservoir,\n"
        ")\n"
        'print(norms.n_sequences, "texts,", norms.n_valid_tokens, "valid tokens")\n'
        'print("mean log-norm by layer:", norms.lognorm_mean_by_layer.round(3))\n'
        'print("percentiles", norms.lognorm_percentile_levels, "over", norms.percentile_basis, "by layer:")\n'
        "print(norms.lognorm_percentiles_by_layer.round(3))\n"
        "magnitudes.density_figure(norms).show()\n"
        "magnitudes.heatmap_figure(norms).show()",
    ),
    Step(
        "Part 2: log mean norm against position",
        "`position_fit` fits, per layer, a line to the log of the mean norm at each position, over the first "
        "`n_fit_positions` (30) positions that valid tokens reached: 1..30 with position 0 excluded, fewer when "
        "the texts are shorter (the built-in reviews reach position 20). The original's `arange(n_fit)` "
        "silently dropped its undefined point 0. A negative slope means attention writes smaller vectors "
        "further into the text.",
        "fit = magnitudes.position_fit(\n"
        "    norms.norm_mean_by_layer_position, norms.norm_count_by_position, n_fit=config.n_fit_positions\n"
        ")\n"
        'print("positions", fit.positions.min(), "to", fit.positions.max())\n'
        'print("slope by layer:", fit.slope.round(4))',
    ),
    Step(
        "Part 3: does a token's norm follow its predecessors'?",
        "`previous_norm_fit` regresses each token's log-norm on the log-norms of the two tokens before it, "
        "per layer (ordinary least squares over every token whose two predecessors are valid), from the "
        "normal equations X'X and X'y that part 1 summed batch by batch. A large coefficient at t-1 means "
        "norms persist from token to token.",
        "prev = magnitudes.previous_norm_fit(norms.triplet_xtx, norms.triplet_xty, norms.n_regression_triplets)\n"
        'print(prev.n_regression_triplets, "tokens with two valid predecessors")\n'
        "for layer, betas in enumerate(prev.by_layer()):\n"
        '    print(f"layer {layer}:", {k: round(v, 3) for k, v in betas.items()})',
    ),
    Step(
        "The whole study",
        "`run` composes the parts into one typed result (`result.parts`), from which the metrics "
        "(`results.json`), the CSV tables and the figures derive; under `torchrun` each process streams its "
        "share of the texts and the sums are merged. `magnitudes.samples(result)` gives the per-text log RMS "
        "(`log(norm / sqrt(d_model))`) by layer and position for a seeded sample of at most `reservoir` "
        "texts, the input of cross-model comparisons with bootstrap intervals over texts.",
        "result = magnitudes.run(model, config)\n"
        'result.figures["norm_heatmap"].show()\n'
        'result.figures["lognorm_percentiles"].show()\n'
        "per_text = magnitudes.samples(result)\n"
        'print(per_text[per_text.quantity == "log_rms"].groupby("layer")["value"].mean().round(3))\n'
        "result.provenance",
    ),
)
