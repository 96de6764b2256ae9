"""Evaluation, in a room of its own: Avg@k and Pass@k on the studies' benchmarks, for a run at any step,
a saved model or a PEFT adapter (``spectra eval``), and the held-out evaluation during training.

- :mod:`.benchmarks`: the benchmark registry (AIME, AMC, MATH-500, HMMT, Minerva, the organism, files);
- :mod:`.sampling` and :mod:`.sampling_session`: seeded sampling with transformers or vLLM;
- :mod:`.evaluation`: scoring (Avg@k, the unbiased Pass@k) and :class:`~.evaluation.HeldOutEval`, the
  Trainer callback through which training evaluates (the trainer uses evaluation only through it and
  the benchmark names);
- :mod:`.run_model`: the model to evaluate (a run at a step: W0 + ΔW);
- :mod:`.config`, :mod:`.run`, :mod:`.results`: ``spectra eval``'s options, driver and result files.

Evaluation may use the trainer's model loading (:mod:`spectra.train.checkpoint`, the configuration's
errors); the trainer imports from here only :class:`HeldOutEval` and :func:`benchmark_name`
(tests/test_layering.py).
"""
