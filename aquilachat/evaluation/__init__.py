"""Evaluation: perplexity, code execution (HumanEval-X and friends) and writing graded by a judge.

Modules:

- :mod:`.ppl` — token-level perplexity and bits per byte with sliding windows.
- :mod:`.code` — pass@k on HumanEval-X / HumanEval / MBPP; :mod:`.languages` assembles, builds and
  judges each language's test programs; :mod:`.sandbox` (with the launcher ``_jail.py``) runs
  them with no network, resource limits and a throw-away directory; :mod:`.passk` is the
  estimator of Chen et al. 2021.
- :mod:`.writing` — MT-Bench-style single-answer grading by any OpenAI-compatible judge.
- :mod:`.backends` — where completions come from: the local engine or an OpenAI-compatible server.
- :mod:`.datasets` and :mod:`.report` — strict readers, hashes, and JSON / Markdown / PNG reports.

The command line is ``aquilachat eval ppl|code|writing`` (:mod:`aquilachat.commands.eval`); see
``docs/evaluation.md``.
"""
