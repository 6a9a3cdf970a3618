"""Random-weight stand-ins built offline for the demo, the tests and the GPU check: the tiny LLaVA, the tiny judge,
RadEval's checkpoints. Imports core, model, judge, metrics."""
