"""VoiceOps domain library: audio, QC, text, features, model, training, evaluation, registry, storage, config."""
__version__ = "0.1.0"
