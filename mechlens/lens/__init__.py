"""The lens as a library layer below the studies: :mod:`~mechlens.lens.readings` (logit and tuned
readouts of a batch, reduced over the vocabulary), :mod:`~mechlens.lens.corpus` (the same streamed over a
corpus, merged across ranks), :mod:`~mechlens.lens.tuned` (the tuned lens: translators, card, save and
load) and :mod:`~mechlens.lens.training` (training it). :mod:`mechlens.studies.lens` composes them;
nothing here imports a study."""
