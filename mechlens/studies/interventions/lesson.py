"""The lesson of study 6 (notebooks/interventions.ipynb and experiments/interventions.py are generated
from it): one step per part, in order."""

from mechlens.studies import Step

LESSON = (
    Step(
        "Setup: prompt pairs and the model",
        "A pair is `(clean, corrupt, target, foil)`. The built-in pairs test induction: a random segment of "
        "word tokens, then the segment again without its last token; the model should predict that token "
        "(the target). The corrupt prompt replaces the first occurrence by another segment, whose last token is "
        "the foil. The metric is `LD = logit[target] - logit[foil]` at the answer column (the last token; for a "
        "masked LM the `<mask>` standing in the target's place). Both prompts of a pair must tokenize to the same "
        "length. `--data pairs.jsonl` reads your own pairs (columns clean, corrupt, target, foil).",
        """config = interventions.Config(n_pairs=8, segment_length=6, seed=0)
model = load_model("tiny-gpt2")  # or "gpt2" online
pairs = interventions.load_pairs(model, config)
tok = model.tokenizer
print(len(pairs), "pairs; first clean:", repr(tok.decode(pairs.clean.tokens[0])))
print("first corrupt:", repr(tok.decode(pairs.corrupt.tokens[0])))
print("target", repr(tok.decode([int(pairs.target[0])])), "foil", repr(tok.decode([int(pairs.foil[0])])))""",
    ),
    Step(
        "Direct logit attribution",
        "`direct_logit_attribution` caches `blocks.0.hook_resid_pre` (the embeddings), every `hook_attn_out` and "
        "`hook_mlp_out`, each head's `attn.hook_z` and the final norm's scale (`ln_final.hook_scale`) on the clean "
        "prompts. With the scale frozen at its value in that run the readout is affine, so each component's "
        "contribution to `LD` can be read separately and they add up to the model's own `LD` (the identity "
        "error is printed). Masked LMs (post-LN) and soft-capped logits are refused: their readout is not linear "
        "in the residual stream.",
        """refusal = interventions.dla_refusal(model)
if refusal is None:
    dla = interventions.direct_logit_attribution(model, pairs)
    print(dict(zip(dla.components, dla.contribution_mean.numpy().round(2).tolist(), strict=True)))
    print("sum identity error:", dla.identity_error)
else:
    print(refusal)""",
    ),
    Step(
        "Ablation: zero, mean and resample",
        "`ablation` replaces one block's attention or MLP output (or one head's z) at every position of the "
        "clean prompt by zero, its mean over the clean prompts' tokens, or another pair's activation, and "
        "measures the drop of the target's log-prob and the KL divergence from the unablated prediction. Many "
        "ablated rows share one forward pass.",
        """names = interventions.all_hooks(model)
clean = interventions.activations(model, pairs.clean, names)
corrupt = interventions.activations(model, pairs.corrupt, names)
abl = interventions.ablation(model, pairs, clean, seed=config.seed)
for method, row in zip(abl.methods, abl.logprob_drop_mean.numpy().round(2).tolist(), strict=True):
    print(method, dict(zip(abl.components, row, strict=True)))""",
    ),
    Step(
        "Activation patching on a layer x position grid",
        "`activation_patching` runs the corrupt prompt with one clean activation patched in (`denoise`; "
        "`noise` is the reverse) at every layer and position of `hook_resid_pre`, `hook_attn_out` and "
        "`hook_mlp_out`, and for each head's z. The effect is the fraction of the clean-minus-corrupt gap of "
        "`LD` restored (1: as clean, 0: as corrupt). For induction, look for the residual stream carrying the "
        "answer from the first segment's tokens to the last position, and for the heads that move it.",
        """den = interventions.activation_patching(model, pairs, clean, corrupt, "denoise")
print(den.n_rows, "patched rows in", den.n_forwards, "forwards,", round(den.seconds, 2), "s")
print("fraction restored, hook_resid_pre [layer][position]:")
for layer, row in enumerate(den.restored["resid_pre"]):
    print(layer, [None if v is None else round(v, 2) for v in row])""",
    ),
    Step(
        "Attribution patching, with its error",
        "`attribution_patching` estimates every cell of the denoising grid from one clean forward and one "
        "corrupt forward and backward: `(a_clean - a_corrupt) . dLD/da`. It is a first-order approximation, so "
        "it is always reported with its error against exact patching on the same cells.",
        """att = interventions.attribution_patching(model, pairs, clean, den)
print("correlation", round(att.correlation, 3), "| max abs error", round(att.max_abs_error, 3),
      "| speed-up over exact", round(att.speedup, 1))""",
    ),
    Step(
        "The whole study, with intervals over pairs",
        "`run` streams the pairs in batches (`--batch-size`) through the parts and composes one typed result "
        "(`result.parts`), from which `results.json`, the CSV tables and the figures are derived. Every effect "
        "that is a mean over pairs gets a 95% bootstrap interval over pairs (`result.parts.intervals`; the "
        "fraction restored is a ratio of means, so its numerator and gap are resampled together); the headline "
        "names the three strongest components of each part with their intervals. With few pairs the intervals "
        "are wide: an effect whose interval contains 0 is not established. `interventions.samples(result)` gives "
        "the per-pair values by layer that cross-model comparisons bootstrap over.",
        """result = interventions.run(model, config)
print("\\n".join(interventions.headline(result.metrics)))
for e in result.metrics["strongest"]["ablation"]:
    ci = [None if v is None else round(v, 2) for v in e["ci"]]
    print(e["method"], e["component"], round(e["logprob_drop"], 2), "95% CI", ci)
print(interventions.samples(result).head())
result.figures["patching"].show()
result.figures["attribution_vs_exact"].show()
result.provenance""",
    ),
)
