"""Study 1's lesson: the notebook and experiment script, part by part (:mod:`mechlens.studies.position`)."""

from __future__ import annotations

from mechlens.studies import Step

# -- the lesson: the notebook and experiments/position.py, part by part ---------------------------------------------

LESSON = (
    Step(
        "Setup: config, model, texts",
        "The config's defaults are the original study's: the first `seqlen = 6` text tokens of each text, no "
        "BOS (the first text token is position 0; `bos=True` prepends one and drops its prediction, so positions "
        "stay text positions), half the texts for training and the other half as fresh test texts. A masked "
        'LM (`load_model("tiny-mlm")`) gets its `<s> ... </s>` and a pseudo-log-likelihood loss instead. '
        "`encode_texts` keeps the first `seqlen` tokens of each text and refuses shorter texts by name.",
        "config = position.Config(seqlen=6, bos=False)  # as the original: no BOS, first text token = position 0\n"
        'model = load_model("tiny-gpt2")  # or "gpt2" online, with data="hellaswag"\n'
        "train_texts, test_texts = position.split_texts(config)  # the texts of config.data, split in two\n"
        "train_batch = position.encode_texts(model, train_texts, config)\n"
        "test_batch = position.encode_texts(model, test_texts, config)\n"
        'print(len(train_texts), "training texts,", len(test_texts), "test texts")\n'
        'print("token ids of the first:", train_batch.tokens[0].tolist())',
    ),
    Step(
        "Part 1: the loss matrix",
        "`loss_matrix` runs the texts through the model and reads the loss of every text token off the logits "
        "(`unembed.hook_out`): for a causal LM the next-token loss `-log p(token p+1 | tokens 0..p)` at "
        "positions 0..seqlen-2, for a masked LM the loss of token p with that token masked. The result keeps "
        "the `[texts, positions]` tensor, the token ids it refers to and the batch. Look at how the mean and the "
        "spread of the loss change with position: that is all the regressions below can use.",
        "train = position.loss_matrix(model, train_batch, config.batch_size)\n"
        "test = position.loss_matrix(model, test_batch, config.batch_size)\n"
        'print(train.kind, "loss, [texts, positions] =", tuple(train.loss.shape))\n'
        'print("mean by position:", train.mean_by_position().round(3))\n'
        'print("sd by position:  ", train.std_by_position().round(3))\n'
        'position.loss_figures(train)["loss_by_position"].show()',
    ),
    Step(
        "Part 2: OLS of position on loss",
        "`fit_position_ols` regresses position on loss, `position ~ const + loss`, over every (text, position) "
        "of the training matrix with statsmodels (the full table) and sklearn's LinearRegression (the same "
        "line). Look at the slope's sign and R²: how much of the position a single loss value explains "
        "linearly. A loss that is not monotonic in position gives an R² near 0 even when the position is "
        "recoverable from it (part 3).",
        "ols = position.fit_position_ols(train.loss)\n"
        "print(ols.summary)\n"
        'print("sklearn: intercept", ols.sklearn_intercept, "slope", ols.sklearn_slope)\n'
        'position.ols_figures(ols)["linear_predictions"].show()',
    ),
    Step(
        "Part 3: multinomial logistic regression",
        "`fit_position_logistic` classifies the position from the loss alone (one intercept and slope per "
        "position), fitted on the training matrix and scored on it and on the fresh test texts. Compare the "
        "accuracy with chance (1 / positions), and see which positions are recognisable: those whose losses "
        "stand apart from the others' (on tiny-gpt2 and the default texts, positions 0 and 1).",
        "logistic = position.fit_position_logistic(train.loss, test.loss, config)\n"
        'print(f"accuracy train {logistic.accuracy_train:.3f}, test {logistic.accuracy_test:.3f}, "\n'
        '      f"chance {logistic.chance:.3f}, {logistic.n_iter} iterations")\n'
        'print("test accuracy by position:", logistic.accuracy_by_position_test.round(3))\n'
        'position.logistic_figures(logistic)["accuracy_test"].show()',
    ),
    Step(
        "Part 4: confusion matrices",
        "`confusion` counts the classifier's predictions by true (rows) and predicted (columns) position, on "
        "the training and the test rows, and as percent of each true position. Look at where the mass sits "
        "off the diagonal: later positions, whose losses overlap, are confused with each other.",
        "conf = position.confusion(logistic)\n"
        'print("test counts [true, predicted]:")\n'
        "print(conf.counts_test)\n"
        'position.confusion_figures(conf)["confusion_test"].show()',
    ),
    Step(
        "All parts at once: run",
        "`run` composes the four parts (the same numbers as above) into `result.parts`, a `PositionResult` from "
        "which `results.json`'s metrics are derived, with the CSV tables, the figures and the provenance that "
        "`mechlens run position` writes. `samples` gives the training losses one row per (text, position): "
        "what a cross-model comparison resamples. For a corpus, `run` streams the texts a mini-batch at a time "
        "(`stream_losses`) instead of holding the two matrices: the loss by position and the OLS (normal "
        "equations) are accumulated over every text, and a seeded reservoir of at most `n_samples` texts per "
        "split (10,000 by default: here every text) feeds the logistic regression, the confusion matrices and "
        "`samples`; `sampled` says whether it had to drop texts. Under `torchrun` each process streams its share "
        "of the texts and the statistics are merged, with the same results.",
        "result = position.run(model, config)\n"
        "print(position.headline(result.metrics)[1])\n"
        "parts = result.parts  # the typed result\n"
        'print(f"sampled: {parts.sampled}; kept {parts.logistic_sample_texts} of {parts.n_texts_train} texts")\n'
        "print(position.samples(result).head())\n"
        'result.figures["loss_by_position"].show()\n'
        'result.figures["confusion_test"].show()\n'
        "result.provenance",
    ),
)
