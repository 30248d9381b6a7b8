"""btrm: Bradley-Terry reward models — packed DeepSpeed training, scoring, serving, evaluation."""

__version__ = "0.1.0"

__all__ = ["RewardModel", "RemoteScorer", "__version__"]


def __getattr__(name):
    # Lazy: `import btrm` must stay cheap (the launcher imports it on every rank).
    if name == "RewardModel":
        from btrm.inference.scorer import RewardModel

        return RewardModel
    if name == "RemoteScorer":
        from btrm.inference.remote import RemoteScorer

        return RemoteScorer
    raise AttributeError(name)
