"""The lens study's lesson: the notebook and experiment script, part by part (:mod:`mechlens.studies.lens`)."""

from mechlens.studies import Step

LESSON = (
    Step(
        "Setup: config, models, the text",
        "The study reads one text. Conventions that differ from the original notebook, each a `Config` "
        "field: parts 1-2 read readout point `layer` (default the middle one, `(n_layers + 1) // 2`, i.e. "
        "`n_layers // 2` for an even depth; the original read one fixed layer of roberta-large); a causal LM "
        "gets BOS prepended (`bos=True`; HF's GPT-2 tokenizer adds none, `bos=False` feeds the text as is); "
        "the heatmap's colour is min-max scaled over text tokens only (`heatmap_specials=True` also masks "
        "`<s>`/`</s>` and scales over them, as the original did). The readout is the model's own final norm "
        "and unembedding (the full MLM head for a masked LM) at every readout point: 0 = the embeddings "
        "(`blocks.0.hook_resid_pre`), `l + 1` = the output of block `l` (`blocks.l.hook_resid_post`).",
        "config = lens.Config()  # position=8 (' eggs'), layer=None (the middle one), bos=True\n"
        'model = load_model("tiny-mlm")  # or "roberta-large" online\n'
        "batch = lens.text_batch(model, config.text)  # <s> ... </s>\n"
        "print(model.tokenizer.convert_ids_to_tokens(batch.tokens[0].tolist()))\n"
        "print('parts 1-2 read readout point', lens.default_layer(model), 'of 0 ..', model.cfg.n_layers)",
    ),
    Step(
        "Parts 1-2: one layer, unmasked then masked",
        "`masked_lens` reads the studied position (text token `config.position`) through the MLM head at "
        "every readout point, once in the text as given and once with that position replaced by `<mask>` "
        "(one forward of both sequences). `part1_unmasked` and `part2_masked` are readout point `layer`: "
        "unmasked, the model sees the token and copies it; masked, it has to infer it from the context. "
        "Look at the gap between the two log-probs of the original token.",
        "masked = lens.masked_lens(model, batch, position=config.position, layer=config.layer, top_k=config.top_k)\n"
        "print('target', repr(masked.target_token), 'at readout point', masked.layer)\n"
        "print('unmasked:', masked.part1_unmasked)\n"
        "print('masked:  ', masked.part2_masked)",
    ),
    Step(
        "Part 3: the laminar view and the sqrt(layer) fit",
        "The masked position at every readout point: the original token's log-prob and rank, the top-1 "
        "log-prob, and a least-squares fit `log-prob ~ intercept + slope * sqrt(layer)` (`sqrt_layer_fit`; "
        "on a 2-d array it fits every position and exposes each one's intercept and slope). In a trained "
        "model the target's log-prob rises with depth, fastest in the last layers.",
        "fit = lens.sqrt_layer_fit(masked.target_logprob)\n"
        "print('log-prob by layer', masked.target_logprob.round(2), 'rank', masked.target_rank)\n"
        "print('top-1 by layer', masked.predicted_tokens)\n"
        "print(f'intercept {fit.mean.intercept:.2f}, slope {fit.mean.slope:.2f} per sqrt(layer)')\n"
        "lens.laminar_figure(masked.target_logprob, masked.max_logprob, fit.mean, 'the masked position').show()",
    ),
    Step(
        "Parts 4-5: every position masked in turn",
        "`sliding_mask` builds one variant per text position with that position masked and runs them all "
        "in one batched forward; each is read out at its masked position. Per readout point and position: "
        "the original token's log-prob and rank, and the top-2 gap (top-1 minus top-2 log-prob: how "
        "decided the lens is). The per-position fits give each position's intercept and slope; look for "
        "positions the last layer recovers (rank 0) and for where the gap opens.",
        "sliding = lens.sliding_mask(model, batch, top_k=config.top_k)\n"
        "per_position = lens.sqrt_layer_fit(sliding.target_logprob)\n"
        "for p, tok in enumerate(sliding.tokens):\n"
        "    print(f'{p:2d} {tok!r:>12} final rank {sliding.target_rank[-1, p]:5d}  '\n"
        "          f'top-2 gap {sliding.top2_gap[-1, p]:.2f}  intercept {per_position.intercepts[p]:6.2f}  '\n"
        "          f'slope {per_position.slopes[p]:.2f}')",
    ),
    Step(
        "Part 6: the text heatmap",
        "The sliding mask as a heatmap: rows are readout points, columns the masked positions, each cell "
        "the lens' top-1 token, coloured by its log-prob min-max scaled over the cells shown (text tokens "
        "only by default; `sliding_mask(..., specials=True)` adds `<s>`/`</s>` as the original did, and the "
        "title says which). Hover for the original token's log-prob, rank and the top-2 gap.",
        "lens.sliding_heatmap(sliding).show()",
    ),
    Step(
        "The causal lens",
        "A causal LM read out the same way (final LayerNorm with its statistics recomputed at each readout "
        "point, then the unembedding): at every position the log-prob and rank of the next token, the "
        "entropy, the KL divergence from the final readout, and whether the top-1 already agrees with the "
        "final one. KL falls to 0 at the last readout point by construction.",
        'causal_model = load_model("tiny-gpt2")  # or "gpt2" online\n'
        "cbatch = lens.text_batch(causal_model, config.text, bos=config.bos)  # BOS prepended by default\n"
        "causal = lens.causal_lens(causal_model, cbatch, top_k=config.top_k)\n"
        "print('next-token log-prob by layer', causal.target_logprob.mean(1).round(2))\n"
        "print('KL to final by layer', causal.kl_to_final.mean(1).round(2))\n"
        "print('top-1 agrees with final', causal.top1_agrees_final.mean(1).round(2))\n"
        "lens.rank_figure(causal.rank, causal.tokens[1:]).show()",
    ),
    Step(
        "The tuned lens",
        "The logit lens assumes every layer speaks the final layer's basis. The tuned lens (Belrose et al. "
        "2023) learns one affine translator per readout point (`d_model x d_model` + bias, starting at the "
        "identity, the last one kept the identity), trained to minimise KL(final || translated readout) on "
        "streamed texts (`mechlens train-lens --model M --data SOURCE --out DIR`, or "
        "`mechlens.train_tuned_lens`). The embedded models ship one (`tuned='auto'` reads it); "
        "`Config(tuned=DIR)` reads your own, `tuned='none'` none. Both lenses are read from the same forward, "
        "at the same positions: compare where each one's KL to the final readout falls below 1 nat. A single "
        "text may be among the lens' training texts: for a held-out evaluation pass "
        "`data=` (the lens' own training source is then read on its held-out texts only).",
        'tuned = lens.tuned_lens_for(causal_model, "tiny-gpt2")  # the shipped tuned lens of tiny-gpt2\n'
        "print('trained on', tuned.card.data, 'for', tuned.card.steps, 'steps; held out: the first',\n"
        "      tuned.card.heldout, 'texts')\n"
        'compared = lens.run(causal_model, lens.Config(tuned="tiny-gpt2"))\n'
        "print('KL to final, logit lens', compared.parts.tuned.logit.kl_to_final_by_layer.round(2))\n"
        "print('KL to final, tuned lens', compared.parts.tuned.tuned.kl_to_final_by_layer.round(2))\n"
        'compared.figures["tuned_kl_to_final"].show()',
    ),
    Step(
        "The whole study",
        "`run` composes the parts (the masked parts from one batched forward) into a typed result "
        "(`result.parts`), from which `results.json`'s metrics, the CSV tables and the figures are derived; "
        "`samples(result)` gives the per-token values behind the by-layer means, for comparisons across "
        "models with bootstrap intervals.",
        "result = lens.run(model, config)\n"
        'result.figures["laminar"].show()\n'
        'result.figures["heatmap"].show()\n'
        "causal_result = lens.run(causal_model, config)\n"
        'causal_result.figures["heatmap"].show()\n'
        "print(lens.samples(causal_result).groupby(['quantity', 'layer'])['value'].mean().unstack())\n"
        "result.provenance",
    ),
)
